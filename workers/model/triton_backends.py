"""The Triton kernels of kernels/ behind the model's backend interfaces, and backend choice.

    TritonPagedAttention   write_kv + paged_attention (kernels/attention.py), and the
                           rotary of q and k (kernels/rope.py) as a RotaryBackend, the
                           RMSNorms with fused residual adds (kernels/rmsnorm.py), and
                           one-token dense projections (kernels/gemv.py)
    TritonMoE              moe_mxfp4 on the packed checkpoint experts (kernels/moe.py)

Both honour the contracts of workers/model/attention.py and workers/model/moe.py, so the
torch references (TorchPagedAttention, TorchMoE) stay the oracle they are tested against.
Neither synchronises with the host: every shape the kernels launch with comes from host
ints (token and sequence counts), everything data-dependent stays on the device, so a
decode step built from them can be captured in a CUDA graph.

`make_backends` picks a pair by name; by default the kernels on CUDA and the references
elsewhere. On CPU the kernels run only through Triton's interpreter, which must be switched
on (TRITON_INTERPRET=1) before triton is first imported: the tests do that.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from tandem.kernels.attention import paged_attention, write_kv
from tandem.kernels.gemv import gemv
from tandem.kernels.moe import experts_mxfp4, moe_mxfp4
from tandem.kernels.rmsnorm import rmsnorm
from tandem.kernels.rope import rotary_embedding_
from tandem.workers.model.attention import (
    AttentionBackend,
    AttentionMetadata,
    TorchPagedAttention,
)
from tandem.workers.model.layers import LinearBackend, NormBackend, RotaryBackend
from tandem.workers.model.moe import MoEBackend, MoEWeights, TorchMoE

KernelsName = Literal["torch", "triton"]
KERNELS_NAMES: tuple[str, ...] = ("torch", "triton")


class TritonPagedAttention(AttentionBackend, RotaryBackend, NormBackend, LinearBackend):
    """Paged attention through the Triton kernels: one write launch, one attention launch
    (plus a merge launch when the key range is split, as for small decode batches). As a
    RotaryBackend it also rotates q and k, in place, in one launch; as a NormBackend it runs
    every RMSNorm of the model with the residual add fused in (kernels/rmsnorm.py); as a
    LinearBackend it runs one-token projections of bf16/fp16 weights on CUDA through the
    GEMV kernel (kernels/gemv.py) and everything else through cuBLAS."""

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [T, in] -> [T, out]. At T = 1 on an H100 (20b shapes, 24 layers' weights): q/k/v
        12.2 against cuBLAS's 13.1 us, o_proj 10.1 against 14.4, lm_head 367 against 407."""
        if x.shape[0] != 1 or not x.is_cuda or weight.dtype not in (torch.bfloat16,
                                                                    torch.float16):
            return torch.nn.functional.linear(x, weight, bias)
        return gemv(x, weight, bias)

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [T, d] -> (normed, x + residual): one launch."""
        return rmsnorm(x, weight, eps, residual)

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, K, D], cos/sin [T, D/2] fp32 -> (q, k), rotated in place."""
        rotary_embedding_(q, k, cos, sin)
        return q, k

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        group_index: int,
        sinks: torch.Tensor,
        sliding_window: int | None,
        scale: float,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, K, D], caches [N, block_size, K, D], sinks [H] -> [T, H, D]."""
        tables = metadata.groups[group_index]
        write_kv(k, v, key_cache, value_cache, tables.slot_mapping)
        return paged_attention(
            q,
            key_cache,
            value_cache,
            tables.block_tables,
            metadata.seq_lens,
            metadata.query_start_loc,
            sinks,
            scale,
            sliding_window,
        )


class TritonMoE(MoEBackend):
    """The MXFP4 MoE kernels: routing and grouping on the device, two grouped GEMMs that
    decode the packed experts in registers, a weighted sum over the k slots."""

    def forward(
        self, x: torch.Tensor, w: MoEWeights, top_k: int, swiglu_limit: float
    ) -> torch.Tensor:
        """x [T, d] -> [T, d] in x's dtype."""
        return moe_mxfp4(
            x,
            w.router_weight,
            w.router_bias,
            w.gate_up_blocks,
            w.gate_up_scales,
            w.gate_up_bias,
            w.down_blocks,
            w.down_scales,
            w.down_bias,
            top_k,
            swiglu_limit,
        )

    def expert_pairs(
        self,
        x: torch.Tensor,
        w: MoEWeights,
        experts: torch.Tensor,
        weights: torch.Tensor,
        swiglu_limit: float,
    ) -> torch.Tensor:
        """x [P, d], experts [P], weights [P] -> [P, d] fp32: the pairs as tokens of k = 1."""
        return experts_mxfp4(
            x,
            weights.float().reshape(-1, 1),
            experts.to(torch.int32).reshape(-1, 1),
            w.gate_up_blocks,
            w.gate_up_scales,
            w.gate_up_bias,
            w.down_blocks,
            w.down_scales,
            w.down_bias,
            swiglu_limit,
        )


def default_kernels(device: torch.device | str) -> KernelsName:
    """The Triton kernels on CUDA; the torch references elsewhere (CPU, and the oracle)."""
    return "triton" if torch.device(device).type == "cuda" else "torch"


def make_backends(
    name: str | None, device: torch.device | str
) -> tuple[AttentionBackend, MoEBackend]:
    """(attention, moe) backends called `name` ("torch" or "triton"); None: the default for
    `device`. ValueError for an unknown name, or for Triton on a non-CUDA device without
    the interpreter switched on."""
    device = torch.device(device)
    if name is None:
        name = default_kernels(device)
    if name not in KERNELS_NAMES:
        raise ValueError(f"kernels must be one of {KERNELS_NAMES} or None, got {name!r}")
    if name == "torch":
        return TorchPagedAttention(), TorchMoE()
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"kernels 'triton' on device {device} needs TRITON_INTERPRET=1 set before triton "
            "is imported (the CPU interpreter); use kernels 'torch' there instead"
        )
    return TritonPagedAttention(), TritonMoE()
