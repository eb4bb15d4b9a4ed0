"""gpt-oss mixture of experts: packed weights, the backend contract, a torch reference.

Per token t (d = hidden, I = intermediate, E experts, k = top_k):

    logits = Wr t + br                          # [E], float32
    v, idx = topk(logits, k)                    # descending
    w      = softmax(v)                         # over the k selected logits only
    z      = W1[e] t + b1[e]                    # [2I], rows interleaved: even gate, odd up
    g, u   = min(z[0::2], L), clamp(z[1::2], -L, L)
    a      = (u + 1) * g * sigmoid(1.702 g)     # [I]
    y      = sum_k w_k (W2[e_k] a + b2[e_k])    # b2 is weighted too

W1 and W2 stay MXFP4 exactly as the checkpoint stores them ([E, out, in/32, 16] bytes).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from tandem.kernels.mxfp4 import dequantize_mxfp4

SWIGLU_ALPHA = 1.702
"""Sigmoid gain of gpt-oss' SwiGLU; fixed by the model, not in its config."""


@dataclass
class MoEWeights:
    """One layer's router and experts, packed as in the Hugging Face checkpoint."""

    router_weight: torch.Tensor
    # [E, d] model dtype.
    router_bias: torch.Tensor
    # [E] model dtype.
    gate_up_blocks: torch.Tensor
    # [E, 2I, d/32, 16] uint8; row 2j is gate j, row 2j+1 is up j.
    gate_up_scales: torch.Tensor
    # [E, 2I, d/32] uint8.
    gate_up_bias: torch.Tensor
    # [E, 2I] model dtype, interleaved like the rows.
    down_blocks: torch.Tensor
    # [E, d, I/32, 16] uint8.
    down_scales: torch.Tensor
    # [E, d, I/32] uint8.
    down_bias: torch.Tensor
    # [E, d] model dtype.


class MoEBackend(ABC):
    """Routed expert MLP of gpt-oss.

    Contract of `forward`: x [T, d] (already normalised) -> [T, d] in x's dtype, computing
    the function in the module docstring; router logits and softmax in float32. Never
    mutates the weights.
    """

    @abstractmethod
    def forward(
        self, x: torch.Tensor, w: MoEWeights, top_k: int, swiglu_limit: float
    ) -> torch.Tensor:
        """x [T, d] -> [T, d]."""

    @abstractmethod
    def expert_pairs(
        self,
        x: torch.Tensor,
        w: MoEWeights,
        experts: torch.Tensor,
        weights: torch.Tensor,
        swiglu_limit: float,
    ) -> torch.Tensor:
        """The experts alone, for a routing made elsewhere (expert parallelism).

        x [P, d], one row per routed (token, slot) pair; experts [P] int, indices into w's
        expert tensors (which may hold a subset of the layer's experts; the router fields
        are not read); weights [P] float32 -> y [P, d] float32 with
        y[p] = weights[p] * (W2[e] a + b2[e]) for e = experts[p], a as in the module
        docstring. Summing a token's rows gives `forward`'s output before its final cast.
        """


def route(x: torch.Tensor, w: MoEWeights, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts of each token and their weights: x [T, d] -> ([T, k] int64, [T, k] float32)."""
    logits = torch.nn.functional.linear(
        x.float(), w.router_weight.float(), w.router_bias.float()
    )  # [T, E]
    values, experts = torch.topk(logits, top_k, dim=-1)  # [T, k], descending
    return experts, torch.softmax(values, dim=-1)


def clamped_swiglu(gate_up: torch.Tensor, limit: float) -> torch.Tensor:
    """[N, 2I] interleaved gate/up -> [N, I]."""
    gate = gate_up[:, 0::2].clamp(max=limit)
    up = gate_up[:, 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(SWIGLU_ALPHA * gate)


class TorchMoE(MoEBackend):
    """Reference backend: loops over the experts the batch uses, dequantising each per call."""

    def forward(
        self, x: torch.Tensor, w: MoEWeights, top_k: int, swiglu_limit: float
    ) -> torch.Tensor:
        experts, weights = route(x, w, top_k)  # [T, k], [T, k]
        x32 = x.float()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, d]
        for e in torch.unique(experts).tolist():
            token, slot = torch.nonzero(experts == e, as_tuple=True)  # [n], [n]
            w1 = dequantize_mxfp4(w.gate_up_blocks[e], w.gate_up_scales[e])  # [2I, d]
            w2 = dequantize_mxfp4(w.down_blocks[e], w.down_scales[e])  # [d, I]
            hidden = x32[token] @ w1.T + w.gate_up_bias[e].float()  # [n, 2I]
            act = clamped_swiglu(hidden, swiglu_limit)  # [n, I]
            y = act @ w2.T + w.down_bias[e].float()  # [n, d]
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.to(x.dtype)

    def expert_pairs(
        self,
        x: torch.Tensor,
        w: MoEWeights,
        experts: torch.Tensor,
        weights: torch.Tensor,
        swiglu_limit: float,
    ) -> torch.Tensor:
        """x [P, d], experts [P], weights [P] -> [P, d] float32."""
        x32 = x.float()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [P, d]
        for e in torch.unique(experts).tolist():
            (rows,) = torch.nonzero(experts == e, as_tuple=True)  # [n]
            w1 = dequantize_mxfp4(w.gate_up_blocks[e], w.gate_up_scales[e])  # [2I, d]
            w2 = dequantize_mxfp4(w.down_blocks[e], w.down_scales[e])  # [d, I]
            hidden = x32[rows] @ w1.T + w.gate_up_bias[e].float()  # [n, 2I]
            act = clamped_swiglu(hidden, swiglu_limit)  # [n, I]
            y = act @ w2.T + w.down_bias[e].float()  # [n, d]
            out[rows] = y * weights[rows, None].float()
        return out
