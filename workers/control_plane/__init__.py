"""The Redis control plane: worker registry with heartbeats, and per-worker KV block events.

No torch here: the router imports this package. Layout of the keys: `connection.py`.
"""

from tandem.workers.control_plane.connection import (
    ControlPlaneUnavailable,
    KeySpace,
    make_client,
    new_incarnation,
    redact_url,
)
from tandem.workers.control_plane.events import KVEvent, decode_event, encode_event
from tandem.workers.control_plane.publisher import KVEventPublisher
from tandem.workers.control_plane.reader import KVEventEntry, KVEventReader
from tandem.workers.control_plane.registry import (
    ROLES,
    WorkerCapacity,
    WorkerInfo,
    WorkerLoad,
    WorkerRegistry,
)

__all__ = [
    "ROLES",
    "ControlPlaneUnavailable",
    "KVEvent",
    "KVEventEntry",
    "KVEventPublisher",
    "KVEventReader",
    "KeySpace",
    "WorkerCapacity",
    "WorkerInfo",
    "WorkerLoad",
    "WorkerRegistry",
    "decode_event",
    "encode_event",
    "make_client",
    "new_incarnation",
    "redact_url",
]
