"""Configuration of an expert-parallel worker."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.workers.expert_parallel.dispatch import DISPATCH_NAMES
from tandem.workers.expert_parallel.placement import PLACEMENT_POLICIES


@dataclass(frozen=True)
class ExpertParallelConfig:
    size: int = 1
    # N: ranks of the worker (GPUs of one replica). 1: today's one-process engine.
    placement: str = "contiguous"
    # "contiguous" or "round_robin" (ExpertPlacement).
    dispatch: str = "replicated"
    # "replicated" (one all-reduce) or "all_to_all" (ExpertDispatcher implementations).
    timeout_s: float = 30.0
    # Bound on every collective: a rank that stops answering fails the step within it.
    start_timeout_s: float = 600.0
    # Bound on the followers' start (process start, group join, loading their experts).

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"ExpertParallelConfig.size must be >= 1, got {self.size}")
        if self.placement not in PLACEMENT_POLICIES:
            raise ValueError(
                f"ExpertParallelConfig.placement must be one of {PLACEMENT_POLICIES}, "
                f"got {self.placement!r}"
            )
        if self.dispatch not in DISPATCH_NAMES:
            raise ValueError(
                f"ExpertParallelConfig.dispatch must be one of {DISPATCH_NAMES}, "
                f"got {self.dispatch!r}"
            )
        for name in ("timeout_s", "start_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"ExpertParallelConfig.{name} must be > 0, got {getattr(self, name)}"
                )
