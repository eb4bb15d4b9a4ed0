r"""KV block events as they travel through Redis streams.

A worker's stream `tandem:{cluster}:kv:{replica}` is the history of its prefix cache:

    reset  stored h0  stored h1(<-h0)  removed h0  ...  reset  stored h7  ...
    seq 0  seq 1      seq 2            seq 3            seq 9  seq 10
    \_______________ incarnation A _______________/     \__ A, after a resync __

Applying the entries in order to an empty map (reset = forget everything of this worker)
gives the set of block hashes the worker can serve from cache. Every entry carries the
worker's incarnation and a per-incarnation sequence number, which lets readers notice
what they missed (trimmed, dropped while Redis was down, a restarted worker) and reset
instead of keeping stale blocks: see `reader.py`.

Stream entry fields (all strings): kind ("stored" | "removed" | "reset"), group,
block_hash (hex), parent_hash (hex or ""), num_tokens, incarnation, seq.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EventKind = Literal["stored", "removed", "reset"]
KINDS: tuple[str, ...] = ("stored", "removed", "reset")
# Block hashes are 16 bytes today (workers/kv/block_hash.py); the bound only rejects garbage.
_MAX_HASH_BYTES = 64


def _check_hash(name: str, value: object) -> None:
    if not isinstance(value, bytes) or not 0 < len(value) <= _MAX_HASH_BYTES:
        raise ValueError(f"{name} must be 1..{_MAX_HASH_BYTES} bytes, got {value!r}")


@dataclass(frozen=True)
class KVEvent:
    """One change to a worker's prefix cache (the engine maps its block-pool events here)."""

    kind: EventKind
    # "stored": a full block became findable by hash; "removed": it was evicted;
    # "reset": forget every block of this worker (restart, resync, or a detected gap).
    group: str = ""
    # KV group name ("full" / "sliding"); "" only for resets.
    block_hash: bytes = b""
    parent_hash: bytes | None = None
    # The previous block's hash in the chain (None for a sequence's first block); stored only.
    num_tokens: int = 0
    # Tokens in the block (stored only; 0 otherwise).

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "reset":
            payload = (self.group, self.block_hash, self.parent_hash, self.num_tokens)
            if payload != ("", b"", None, 0):
                raise ValueError("a reset event carries no group, hashes or num_tokens")
            return
        if not isinstance(self.group, str) or not self.group or not self.group.isprintable():
            raise ValueError(f"group must be a non-empty printable str, got {self.group!r}")
        _check_hash("block_hash", self.block_hash)
        if self.kind == "stored":
            if self.parent_hash is not None:
                _check_hash("parent_hash", self.parent_hash)
            if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int):
                raise ValueError(f"num_tokens must be an int, got {self.num_tokens!r}")
            if self.num_tokens < 1:
                raise ValueError(f"num_tokens of a stored block must be >= 1: {self.num_tokens}")
        elif self.parent_hash is not None or self.num_tokens != 0:
            raise ValueError("a removed event carries only group and block_hash")

    @classmethod
    def stored(
        cls, group: str, block_hash: bytes, parent_hash: bytes | None, num_tokens: int
    ) -> KVEvent:
        return cls("stored", group, block_hash, parent_hash, num_tokens)

    @classmethod
    def removed(cls, group: str, block_hash: bytes) -> KVEvent:
        return cls("removed", group, block_hash)

    @classmethod
    def reset(cls) -> KVEvent:
        return cls("reset")


def encode_event(event: KVEvent, incarnation: str, seq: int) -> dict[str, str]:
    """The stream entry fields of `event` (see the module docstring)."""
    return {
        "kind": event.kind,
        "group": event.group,
        "block_hash": event.block_hash.hex(),
        "parent_hash": "" if event.parent_hash is None else event.parent_hash.hex(),
        "num_tokens": str(event.num_tokens),
        "incarnation": incarnation,
        "seq": str(seq),
    }


def decode_event(fields: dict[str, str]) -> tuple[KVEvent, str, int]:
    """(event, incarnation, seq) from stream entry fields; ValueError if malformed."""
    try:
        kind = fields["kind"]
        parent = fields["parent_hash"]
        event = KVEvent(
            kind=kind,  # type: ignore[arg-type]  # validated by KVEvent
            group=fields["group"],
            block_hash=bytes.fromhex(fields["block_hash"]),
            parent_hash=bytes.fromhex(parent) if parent else None,
            num_tokens=int(fields["num_tokens"]),
        )
        incarnation = fields["incarnation"]
        seq = int(fields["seq"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"malformed KV event entry: {type(error).__name__}: {error}") from None
    if not incarnation or seq < 0:
        raise ValueError(f"malformed KV event entry: incarnation {incarnation!r}, seq {seq}")
    return event, incarnation, seq
