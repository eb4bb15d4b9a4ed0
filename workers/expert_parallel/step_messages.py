"""What rank 0 broadcasts to the followers each step: int64 tensors, never a pickle.

Every message is a fixed header, then (for INIT and STEP) one body tensor:

    header [4] int64:  command | a | b | c
    INIT       a = block_size, b = G (KV groups)          body [G]: blocks per group
    STEP       a = R (requests), b = T (tokens), c = X    body [T + 2R + GR + X]:
                   token ids [T] | seq_lens [R] | num_new_tokens [R]
                   | table lengths [G, R] | table entries [X] (group-major, request order)
    BLOCKS     a = G, b = X                                body [G + X]: ids per group
                   counts [G] | block ids [X] (group-major); then one broadcast per
                   layer with blocks (kv_replica.py): KV that arrived by transfer
    HEARTBEAT  (no body): the engine is idle but alive; the followers keep waiting
    STOP       (no body): leave the group and exit 0

A STEP carries exactly what ModelRunner turns into tensors (ScheduledRequest's tokens,
context lengths and block tables), so a follower builds the same input_ids, positions
and attention metadata as rank 0 and writes the same cache slots of its own replicated
KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch

from tandem.workers.engine.scheduler import ScheduledRequest

HEADER_LEN = 4


class Command(IntEnum):
    INIT = 1
    STEP = 2
    HEARTBEAT = 3
    STOP = 4
    BLOCKS = 5


@dataclass(frozen=True)
class StepInputs:
    """One step's model inputs as plain ints (the follower's view of a SchedulerOutput)."""

    token_ids: tuple[int, ...]
    # [T] new tokens of every request, concatenated in request order.
    seq_lens: tuple[int, ...]
    # [R] context length after the step.
    num_new_tokens: tuple[int, ...]
    # [R] new tokens this step.
    block_tables: tuple[tuple[tuple[int, ...], ...], ...]
    # [G][R] whole block table of each request (-1 = released).

    def __post_init__(self) -> None:
        if len(self.seq_lens) != len(self.num_new_tokens):
            raise ValueError("StepInputs.seq_lens and num_new_tokens differ in length")
        if sum(self.num_new_tokens) != len(self.token_ids):
            raise ValueError("StepInputs.token_ids does not match sum(num_new_tokens)")
        if any(len(tables) != len(self.seq_lens) for tables in self.block_tables):
            raise ValueError("StepInputs.block_tables needs one table per request per group")

    @staticmethod
    def from_scheduled(scheduled: Sequence[ScheduledRequest], num_groups: int) -> StepInputs:
        return StepInputs(
            token_ids=tuple(t for r in scheduled for t in r.token_ids),
            seq_lens=tuple(r.seq_len for r in scheduled),
            num_new_tokens=tuple(r.num_new_tokens for r in scheduled),
            block_tables=tuple(
                tuple(tuple(r.block_tables[g]) for r in scheduled) for g in range(num_groups)
            ),
        )

    def positions(self) -> list[int]:
        return [
            p
            for n, s in zip(self.num_new_tokens, self.seq_lens, strict=True)
            for p in range(s - n, s)
        ]

    def encode(self) -> tuple[list[int], list[int]]:
        """(header, body) as int lists for STEP."""
        lengths = [len(row) for tables in self.block_tables for row in tables]
        entries = [b for tables in self.block_tables for row in tables for b in row]
        header = [Command.STEP, len(self.seq_lens), len(self.token_ids), len(entries)]
        body = [*self.token_ids, *self.seq_lens, *self.num_new_tokens, *lengths, *entries]
        return header, body

    @staticmethod
    def decode(header: Sequence[int], body: Sequence[int], num_groups: int) -> StepInputs:
        """Inverse of encode; ValueError when the sizes disagree."""
        command, num_reqs, num_tokens, num_entries = header
        if command != Command.STEP:
            raise ValueError(f"not a STEP header: {list(header)}")
        expected = num_tokens + 2 * num_reqs + num_groups * num_reqs + num_entries
        if len(body) != expected:
            raise ValueError(f"STEP body has {len(body)} ints, header says {expected}")
        at = 0

        def take(n: int) -> list[int]:
            nonlocal at
            at += n
            return list(body[at - n : at])

        token_ids, seq_lens, num_new = take(num_tokens), take(num_reqs), take(num_reqs)
        lengths = take(num_groups * num_reqs)
        tables = []
        for g in range(num_groups):
            tables.append(tuple(tuple(take(n)) for n in lengths[g * num_reqs : (g + 1) * num_reqs]))
        return StepInputs(tuple(token_ids), tuple(seq_lens), tuple(num_new), tuple(tables))


def header_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """[HEADER_LEN] int64, zero-padded."""
    padded = list(values) + [0] * (HEADER_LEN - len(values))
    return torch.tensor(padded, dtype=torch.int64, device=device)
