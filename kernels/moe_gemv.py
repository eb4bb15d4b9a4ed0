"""Small-batch path of the MXFP4 MoE (decode): GEMVs instead of grouped GEMMs.

One program per (token, slot) pair and output tile streams its expert's packed rows
against the pair's single activation row; no grouping, no sort:

    x [T, d] --GEMV 1 + SwiGLU--> act [T * k, I] --GEMV 2 * weight--> y [T * k, d] (fp32)

Two kernel families (kernels/_moe_gemv_triton.py): the bit-placement GEMV (any dtype, the
CPU interpreter included) and, for bf16/fp16 activations on CUDA, the tensor-core GEMV
(mma.sync on the packed words as loaded; activations packed as f16 pairs per 32-group
with their own power-of-two exponent). kernels/moe.py chooses the path (`default_tiling`).

Public: `MoEGemvTiling`, `experts_gemv`, `pack_f16_pairs`, `packed_f16_buffers`,
`swiglu_f16_exponent`,
`GEMV_MAX_PAIRS`, `GEMV_MMA_MAX_PAIRS`.
"""

import math
from dataclasses import dataclass

import torch
import triton

from tandem.kernels._moe_gemv_triton import (
    _down_gemv_kernel,
    _down_gemv_mma_kernel,
    _gate_up_swiglu_gemv_kernel,
    _gate_up_swiglu_gemv_mma_kernel,
    _pack_f16_pairs_kernel,
)


@dataclass(frozen=True)
class MoEGemvTiling:
    """Work split of the small-batch path: one program per (token, slot) pair and tile."""

    block_n: int
    # outputs per program: activation columns of GEMV 1 (2 * block_n weight rows), model
    # dims of GEMV 2
    block_k: int
    # contraction step in elements; a multiple of 32 so whole MXFP4 groups are read
    num_warps: int = 4
    # warps per program
    num_stages: int = 2
    # software-pipelining depth of the K loop
    tensor_cores: bool = False
    # bf16/fp16 activations on CUDA: the GEMVs multiply on tensor cores (mma.sync), four
    # MXFP4 groups a step (block_k unused); block_n a multiple of 8, and 8 * num_warps
    # rows per program at least
    down_block_n: int = 0
    # model dims per program of GEMV 2 when it differs from block_n (0: block_n)
    step: int = 16
    # tensor-core GEMVs: MXFP4 groups whose loads are all issued before their MMAs

    def __post_init__(self) -> None:
        for name, low in (("block_n", 1), ("block_k", 32)):
            value = getattr(self, name)
            if value < low or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {low}, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.down_block_n and self.down_block_n & (self.down_block_n - 1):
            raise ValueError(f"down_block_n must be a power of two, got {self.down_block_n}")
        if self.step not in (4, 8, 16):
            raise ValueError(f"step must be 4, 8 or 16 groups, got {self.step}")
        if self.tensor_cores:
            rows = 8 * self.num_warps
            if self.block_n % 8 or 2 * self.block_n < rows or self.down_n() < rows:
                raise ValueError(
                    f"tensor-core GEMVs need block_n a multiple of 8 and at least {rows} "
                    f"rows per program (8 per warp), got block_n={self.block_n}, "
                    f"down_block_n={self.down_block_n}, num_warps={self.num_warps}")

    def down_n(self) -> int:
        """Model dims per program of GEMV 2."""
        return self.down_block_n or self.block_n


GEMV_MAX_PAIRS = 16
"""Largest T * top_k the default tiling sends down the GEMV path. Each pair streams its
expert's weights on its own, so the path reads pairs x expert bytes where the grouped GEMMs
read each used expert once: it wins while pairs are few (the MoE is launch- and
latency-bound there) and loses once many pairs share experts."""

GEMV_MMA_MAX_PAIRS = 32
"""The same for the tensor-core GEMVs (bf16/fp16 on the GPU), which beat the grouped GEMMs
further: at T=8 (32 pairs) 178 against 267 us (H100, 20b shapes, bench/RESULTS.md)."""


def experts_gemv(x: torch.Tensor, route_weights: torch.Tensor, experts: torch.Tensor,
                 gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor,
                 gate_up_bias: torch.Tensor, down_blocks: torch.Tensor,
                 down_scales: torch.Tensor, down_bias: torch.Tensor, d_ff: int,
                 swiglu_limit: float, alpha: float, tiling: MoEGemvTiling,
                 packed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The small-batch path: y [T * k, d] fp32, row p = token p // k, slot p % k, weighted.
    packed: x already in the tensor-core GEMVs' form (pack_f16_pairs), if at hand."""
    num_tokens, d_model = x.shape
    top_k = experts.shape[1]
    num_pairs = num_tokens * top_k
    flat_experts = experts.reshape(-1).contiguous()                  # [P] int32
    if tiling.tensor_cores:
        return _experts_gemv_mma(x, route_weights, flat_experts, gate_up_blocks,
                                 gate_up_scales, gate_up_bias, down_blocks, down_scales,
                                 down_bias, d_ff, top_k, swiglu_limit, alpha, tiling, packed)
    act = torch.empty((num_pairs, d_ff), dtype=x.dtype, device=x.device)
    grid = (num_pairs, triton.cdiv(d_ff, tiling.block_n))
    _gate_up_swiglu_gemv_kernel[grid](
        x, gate_up_blocks.contiguous(), gate_up_scales.contiguous(), gate_up_bias.contiguous(),
        act, flat_experts,
        d_model, d_ff, gate_up_blocks.stride(1), gate_up_scales.stride(1),
        x.stride(0), act.stride(0), float(swiglu_limit), float(alpha),
        TOP_K=top_k, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
    )
    y = torch.empty((num_pairs, d_model), dtype=torch.float32, device=x.device)
    grid = (num_pairs, triton.cdiv(d_model, tiling.block_n))
    _down_gemv_kernel[grid](
        act, down_blocks.contiguous(), down_scales.contiguous(), down_bias.contiguous(),
        route_weights.reshape(-1).contiguous(), flat_experts, y,
        d_model, d_ff, down_blocks.stride(1), down_scales.stride(1), act.stride(0), y.stride(0),
        BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
    )
    return y


def packed_f16_buffers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (xq [T, K / 32, 2, 4] int64, xe [T, K / 32] int32) for x [T, K]."""
    num_tokens, width = x.shape
    return (torch.empty((num_tokens, width // 32, 2, 4), dtype=torch.int64, device=x.device),
            torch.empty((num_tokens, width // 32), dtype=torch.int32, device=x.device))


def pack_f16_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [T, K] (K a multiple of 32) in the tensor-core GEMVs' packed form:
    (xq [T, K / 32, 2, 4] int64, xe [T, K / 32] int32); see _pack_groups. `route` writes
    the same as a by-product of the router GEMM (moe_mxfp4 uses that)."""
    xq, xe = packed_f16_buffers(x)
    block_g = 16
    _pack_f16_pairs_kernel[(x.shape[0], triton.cdiv(xe.shape[1], block_g))](
        x, xq, xe, xe.shape[1], x.stride(0), BLOCK_G=block_g)
    return xq, xe


def swiglu_f16_exponent(swiglu_limit: float, alpha: float) -> int:
    """Power-of-two exponent that brings every clamped SwiGLU output under 2^14 (f16 holds
    up to 65504): |act| <= (limit + 1) * max(limit, 0.28 / alpha)."""
    bound = (swiglu_limit + 1.0) * max(swiglu_limit, 0.28 / alpha)
    return max(0, math.ceil(math.log2(bound)) - 14) if bound > 0 else 0


def _experts_gemv_mma(x: torch.Tensor, route_weights: torch.Tensor, flat_experts: torch.Tensor,
                      gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor,
                      gate_up_bias: torch.Tensor, down_blocks: torch.Tensor,
                      down_scales: torch.Tensor, down_bias: torch.Tensor, d_ff: int, top_k: int,
                      swiglu_limit: float, alpha: float, tiling: MoEGemvTiling,
                      packed: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The small-batch path on tensor cores: y [T * k, d] fp32, as `experts_gemv`."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.device.type != "cuda":
        raise ValueError(f"tensor-core GEMVs take bf16/fp16 activations on CUDA, got "
                         f"{x.dtype} on {x.device.type}")
    if not math.isfinite(swiglu_limit):
        raise ValueError("tensor-core GEMVs need a finite swiglu_limit (it bounds the "
                         "activations they hold in f16)")
    d_model = x.shape[1]
    num_pairs = flat_experts.numel()
    xq, xe = packed if packed is not None else pack_f16_pairs(x)
    act_exp = swiglu_f16_exponent(swiglu_limit, alpha)
    actq = torch.empty((num_pairs, d_ff // 32, 2, 4), dtype=torch.int64, device=x.device)
    _gate_up_swiglu_gemv_mma_kernel[(num_pairs, triton.cdiv(d_ff, tiling.block_n))](
        xq, xe, gate_up_blocks.contiguous().view(torch.int32), gate_up_scales.contiguous(),
        gate_up_bias.contiguous(), actq, flat_experts, d_ff, d_model // 32, xq.stride(0),
        xe.stride(0), actq.stride(0), act_exp, float(swiglu_limit), float(alpha), 0,
        TOP_K=top_k, BLOCK_N=tiling.block_n, STEP=tiling.step,
        num_warps=tiling.num_warps, num_stages=1,
    )
    y = torch.empty((num_pairs, d_model), dtype=torch.float32, device=x.device)
    _down_gemv_mma_kernel[(num_pairs, triton.cdiv(d_model, tiling.down_n()))](
        actq, down_blocks.contiguous().view(torch.int32), down_scales.contiguous(),
        down_bias.contiguous(), route_weights.reshape(-1).contiguous(), flat_experts, y,
        d_model, d_ff // 32, actq.stride(0), y.stride(0), act_exp, 0,
        BLOCK_N=tiling.down_n(), STEP=tiling.step, num_warps=tiling.num_warps,
        num_stages=1,
    )
    return y
