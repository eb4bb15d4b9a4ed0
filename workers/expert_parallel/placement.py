"""Which rank of an expert-parallel worker holds which experts.

    E = 5 experts on N = 2 ranks

    contiguous     rank 0: 0 1 2      rank 1: 3 4        (the first E mod N ranks get one more)
    round_robin    rank 0: 0 2 4      rank 1: 1 3        (expert e on rank e mod N)

Every expert lives on exactly one rank; a rank may hold none when E < N. A rank's local
index of an expert is its position in `experts_of(rank)` (ascending global ids), which is
also the order of the rows the rank loads from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

PlacementPolicy = Literal["contiguous", "round_robin"]
PLACEMENT_POLICIES: tuple[str, ...] = ("contiguous", "round_robin")


@dataclass(frozen=True)
class ExpertPlacement:
    """A deterministic map expert -> owning rank, the same on every rank."""

    num_experts: int
    # E: experts of one MoE layer (every layer is placed alike).
    world_size: int
    # N: ranks of the worker.
    policy: str = "contiguous"
    # "contiguous" (blocks of consecutive experts) or "round_robin" (expert e on e mod N).
    owners: tuple[int, ...] = field(init=False, repr=False)
    # owners[e]: the rank holding expert e (derived).

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"ExpertPlacement.num_experts must be >= 1, got {self.num_experts}")
        if self.world_size < 1:
            raise ValueError(f"ExpertPlacement.world_size must be >= 1, got {self.world_size}")
        if self.policy not in PLACEMENT_POLICIES:
            raise ValueError(
                f"ExpertPlacement.policy must be one of {PLACEMENT_POLICIES}, got {self.policy!r}"
            )
        e, n = self.num_experts, self.world_size
        if self.policy == "round_robin":
            owners = tuple(i % n for i in range(e))
        else:
            base, extra = divmod(e, n)
            owners = tuple(
                rank for rank in range(n) for _ in range(base + (1 if rank < extra else 0))
            )
        object.__setattr__(self, "owners", owners)

    def experts_of(self, rank: int) -> tuple[int, ...]:
        """Global ids of the experts `rank` holds, ascending."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return tuple(e for e, owner in enumerate(self.owners) if owner == rank)

    def owner_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[E] int64: owners[e], for looking owners up on the device."""
        return torch.tensor(self.owners, dtype=torch.int64, device=device)

    def local_index_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[E] int64: the index of expert e among its owner's experts."""
        index = [0] * self.num_experts
        for rank in range(self.world_size):
            for local, e in enumerate(self.experts_of(rank)):
                index[e] = local
        return torch.tensor(index, dtype=torch.int64, device=device)
