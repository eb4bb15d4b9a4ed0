"""The MoE backend of an expert-parallel rank: the router on every rank, the experts split.

    x [T, d] ─ route (all E experts, fp32) ─> experts [T, k], weights [T, k]
             ─ dispatcher.run(compute = inner.expert_pairs on this rank's experts)
             ─> out [T, d] fp32 ─> x's dtype

The inner backend is the one-process backend of the device (TorchMoE, TritonMoE): its
`expert_pairs` computes the pairs of the experts this rank holds, whose packed tensors
are the only ones in the rank's MoEWeights (the router's are whole).
"""

from __future__ import annotations

import torch

from tandem.workers.expert_parallel.dispatch import ExpertDispatcher
from tandem.workers.model.moe import MoEBackend, MoEWeights, route


class ExpertParallelMoE(MoEBackend):
    """MoEBackend whose forward is collective: every rank of the dispatcher's group must
    run the same layers on the same tokens (see ExpertDispatcher.run)."""

    def __init__(self, inner: MoEBackend, dispatcher: ExpertDispatcher) -> None:
        self.inner = inner
        self.dispatcher = dispatcher

    def forward(
        self, x: torch.Tensor, w: MoEWeights, top_k: int, swiglu_limit: float
    ) -> torch.Tensor:
        held = len(self.dispatcher.placement.experts_of(self.dispatcher.rank))
        if w.gate_up_blocks.shape[0] != held:
            raise ValueError(
                f"rank {self.dispatcher.rank} holds {held} experts but the layer's weights "
                f"have {w.gate_up_blocks.shape[0]}"
            )
        experts, weights = route(x, w, top_k)  # [T, k] global ids, [T, k] fp32

        def compute(rows: torch.Tensor, local: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
            return self.inner.expert_pairs(rows, w, local, wts, swiglu_limit)

        return self.dispatcher.run(x, experts, weights, compute).to(x.dtype)

    def expert_pairs(
        self,
        x: torch.Tensor,
        w: MoEWeights,
        experts: torch.Tensor,
        weights: torch.Tensor,
        swiglu_limit: float,
    ) -> torch.Tensor:
        """The local experts, as the inner backend computes them (no communication)."""
        return self.inner.expert_pairs(x, w, experts, weights, swiglu_limit)
