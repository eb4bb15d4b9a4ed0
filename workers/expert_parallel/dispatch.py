"""Dispatch and combine: how one MoE layer's routed (token, slot) pairs reach the ranks that
hold their experts, and how the results come back.

Every implementation runs the same arithmetic, only the data movement differs:

    x [T, d], experts [T, k] (global ids), weights [T, k]      identical on every rank
        │  (attention is replicated, the router runs on every rank)
        ├─ pairs of rank r's experts ──> compute(rows, local ids, weights) on rank r
        └─ sum over each token's k pairs, across ranks ──> out [T, d] fp32, on every rank

ReplicatedDispatcher (replicated.py): every rank already has every token; each computes
its own experts' pairs and one all-reduce sums the partial outputs.
AllToAllDispatcher (all_to_all.py): each rank sends the pairs of its slice of the tokens
to their experts' owners, the owners compute, a second all-to-all returns the weighted
rows, and an all-gather rebuilds the replicated output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist

from tandem.workers.expert_parallel.placement import ExpertPlacement

ExpertCompute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (rows [P, d], local expert ids [P] int64, weights [P] fp32) -> [P, d] fp32, row p =
# weights[p] * expert(rows[p]); MoEBackend.expert_pairs on this rank's experts.

DispatchName = Literal["replicated", "all_to_all"]
DISPATCH_NAMES: tuple[str, ...] = ("replicated", "all_to_all")


class ExpertDispatcher(ABC):
    """Moves one MoE layer's pairs between the ranks of a group and sums the results.

    Contract of `run`: every rank of the group calls it for the same layer in the same
    order, with the same T and identical x, experts and weights (replicated attention and
    router); it makes collective calls on `group`, so a rank that skips one blocks the
    others until the group's timeout. `compute` is called exactly once per call, with the
    pairs of this rank's experts only (possibly none: P = 0). Returns out [T, d] fp32,
    out[t] = sum over slots j of weights[t, j] * expert_{experts[t, j]}(x[t]), identical on
    every rank; it equals the one-process MoE up to the order of fp32 additions. T = 0
    makes no collective call (every rank sees the same T). Never mutates its inputs.
    """

    def __init__(
        self, placement: ExpertPlacement, rank: int, group: dist.ProcessGroup | None = None
    ) -> None:
        if not 0 <= rank < placement.world_size:
            raise ValueError(f"rank must be in [0, {placement.world_size}), got {rank}")
        self.placement = placement
        self.rank = rank
        self.group = group
        self._owners: dict[torch.device, torch.Tensor] = {}
        self._local: dict[torch.device, torch.Tensor] = {}

    @abstractmethod
    def run(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        compute: ExpertCompute,
    ) -> torch.Tensor:
        """x [T, d], experts [T, k] int, weights [T, k] fp32 -> out [T, d] fp32."""

    def owners(self, device: torch.device) -> torch.Tensor:
        """[E] int64 owner rank of every expert, cached per device."""
        if device not in self._owners:
            self._owners[device] = self.placement.owner_table(device)
        return self._owners[device]

    def local_ids(self, device: torch.device) -> torch.Tensor:
        """[E] int64 index of every expert among its owner's experts, cached per device."""
        if device not in self._local:
            self._local[device] = self.placement.local_index_table(device)
        return self._local[device]


def make_dispatcher(
    name: str, placement: ExpertPlacement, rank: int, group: dist.ProcessGroup | None = None
) -> ExpertDispatcher:
    """The dispatcher called `name` ("replicated" or "all_to_all")."""
    from tandem.workers.expert_parallel.all_to_all import AllToAllDispatcher
    from tandem.workers.expert_parallel.replicated import ReplicatedDispatcher

    if name == "replicated":
        return ReplicatedDispatcher(placement, rank, group)
    if name == "all_to_all":
        return AllToAllDispatcher(placement, rank, group)
    raise ValueError(f"dispatch must be one of {DISPATCH_NAMES}, got {name!r}")
