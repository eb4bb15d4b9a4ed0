"""Messages of the KV transfer protocol: the ticket, the frames on the wire, the result.

A transfer on a pair, as the wire sees it (sender = prefill = rank 0, receiver = decode =
rank 1); every message is a point-to-point send of one contiguous uint8 tensor:

    tag 0        header frame   {"generation", "seq", "status": "ok" | "abandoned", ...}
    tag 2 + l    layer l        packed blocks (pack.py), only layers whose group has blocks
    tag 1        footer frame   {"seq", "status": "ok" | "failed", "first_token", "metadata"}

An "abandoned" header ends the transfer at once (no layers, no footer). Transfers of a
pair go one after another in `seq` order on both sides, so NCCL (which matches sends to
receives in posting order and ignores tags) and gloo (which matches by tag) see the same
stream. Frames are JSON in a fixed-size buffer, so the receiver can post the receive
before it knows what comes; nothing on the wire is ever unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

FRAME_BYTES = 4096
# Fixed size of header and footer frames: 4-byte big-endian length, then UTF-8 JSON.
TAG_HEADER = 0
TAG_FOOTER = 1
TAG_FIRST_LAYER = 2
PROTOCOL_VERSION = 1


class TransferFailed(RuntimeError):
    """A KV transfer did not complete: deadline, peer failure, abandon or protocol error.

    `pair_broken` says whether the pair's process group was torn down (the next transfer
    on this pair builds a new one) or the pair is still usable (the sender abandoned or
    the transfer was cancelled).
    """

    def __init__(self, message: str, pair_broken: bool = True) -> None:
        super().__init__(message)
        self.pair_broken = pair_broken


@dataclass(frozen=True)
class TransferTicket:
    """What the decode side hands to the prefill side for one transfer (JSON-serialisable).

    The receiver makes it (`KVReceiver.expect`), it travels with the prefill request, and
    the sender starts the transfer with it (`KVSender.begin`).
    """

    receiver_id: str
    receiver_instance: str
    # Random per KVReceiver object: a restarted decode worker is a different peer, and the
    # rendezvous keys of its pairs cannot be guessed by someone who never saw a ticket.
    store_address: str
    # "host:port" of the receiver's rendezvous store.
    sender_id: str
    generation: int
    # Pair generation: bumped each time the receiver tears the pair down.
    seq: int
    # Position of this transfer in the pair's stream, from 0 in each generation.
    logical_blocks: tuple[tuple[int, ...], ...]
    # Per KV group, the logical block indices (position // block_size) the receiver needs,
    # in wire order. The sender maps them to its own physical blocks.
    timeout_s: float
    # Time budget of the transfer; each side measures it from its own start.

    def __post_init__(self) -> None:
        for name in ("receiver_id", "receiver_instance", "store_address", "sender_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        parse_address(self.store_address)
        for name in ("generation", "seq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.logical_blocks, tuple) or not all(
            isinstance(g, tuple) and all(isinstance(b, int) and b >= 0 for b in g)
            for g in self.logical_blocks
        ):
            raise ValueError("logical_blocks must be a tuple of tuples of non-negative ints")
        if not (isinstance(self.timeout_s, int | float) and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a finite number, got {self.timeout_s!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    @property
    def num_blocks(self) -> tuple[int, ...]:
        return tuple(len(g) for g in self.logical_blocks)

    def to_json(self) -> str:
        return json.dumps(
            {
                "receiver_id": self.receiver_id,
                "receiver_instance": self.receiver_instance,
                "store_address": self.store_address,
                "sender_id": self.sender_id,
                "generation": self.generation,
                "seq": self.seq,
                "logical_blocks": [list(g) for g in self.logical_blocks],
                "timeout_s": self.timeout_s,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> TransferTicket:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a ticket must be a JSON object")
        data["logical_blocks"] = tuple(tuple(g) for g in data.get("logical_blocks", ()))
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"malformed ticket: {e}") from e


@dataclass(frozen=True)
class TransferResult:
    """A completed transfer, as the receiver sees it: the blocks are in its cache."""

    seq: int
    first_token: int
    # The token the prefill worker sampled from the last prompt position.
    metadata: Mapping[str, Any] = field(default_factory=dict)
    # JSON values the sender attached (counts, timings).


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port); IPv6 hosts in brackets: '[::1]:29500'."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be 'host:port', got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def encode_frame(message: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """JSON message -> uint8 [FRAME_BYTES] on `device`; ValueError if it does not fit."""
    payload = json.dumps(message, separators=(",", ":")).encode()
    if len(payload) > FRAME_BYTES - 4:
        raise ValueError(f"frame of {len(payload)} bytes exceeds {FRAME_BYTES - 4}")
    raw = bytearray(FRAME_BYTES)
    raw[:4] = struct.pack(">I", len(payload))
    raw[4 : 4 + len(payload)] = payload
    return torch.frombuffer(raw, dtype=torch.uint8).to(device)


def decode_frame(frame: torch.Tensor) -> dict[str, Any]:
    """uint8 [FRAME_BYTES] -> JSON object; ValueError on anything malformed."""
    raw = frame.cpu().numpy().tobytes()
    (length,) = struct.unpack(">I", raw[:4])
    if length > FRAME_BYTES - 4:
        raise ValueError(f"frame length {length} exceeds {FRAME_BYTES - 4}")
    message = json.loads(raw[4 : 4 + length].decode())
    if not isinstance(message, dict):
        raise ValueError(f"frame must hold a JSON object, got {type(message).__name__}")
    return message


def header_message(
    generation: int, seq: int, num_blocks: Sequence[int], status: str, reason: str = ""
) -> dict[str, Any]:
    return {
        "version": PROTOCOL_VERSION,
        "generation": generation,
        "seq": seq,
        "num_blocks": list(num_blocks),
        "status": status,
        "reason": reason,
    }


def footer_message(
    seq: int, status: str, first_token: int, metadata: Mapping[str, Any], reason: str = ""
) -> dict[str, Any]:
    return {
        "seq": seq,
        "status": status,
        "first_token": first_token,
        "metadata": dict(metadata),
        "reason": reason,
    }
