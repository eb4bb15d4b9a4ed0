"""MXFP4 mixture-of-experts layer of gpt-oss: routing, grouping, two grouped GEMMs, combine.

    x [T, d] --router (fp32)--> top-k experts and weights per token
      --group--> (token, slot) pairs sorted by expert, each expert padded to BLOCK_M rows
      --GEMM 1 + SwiGLU--> act [padded pairs, I]      (W1 packed MXFP4, decoded in-kernel)
      --GEMM 2 * weight--> y [T * k, d] (fp32)        (W2 packed MXFP4, b2 weighted too)
      --sum over k--> out [T, d]

Weights stay in the checkpoint layout (GPT_OSS.md 3.1, 3.2): gate_up rows interleave gate
(even) and up (odd). Routing, grouping and combine are one Triton launch each (two for
the grouping), and nothing synchronises with the host: the grid is sized by an upper bound
on the number of row blocks and surplus programs exit at once, so decode steps can be
captured in CUDA graphs.

Small batches (decode: a few (token, slot) pairs, about one row per expert) take another
path with the same result: no grouping, two GEMVs per pair (kernels/moe_gemv.py; on CUDA
with bf16/fp16 activations on tensor cores). `default_tiling` picks the path from the
batch size and dtype.

Public: `moe_mxfp4`, `experts_mxfp4` (the experts for a given routing), `route`,
`group_by_expert`, `gate_up_grouped` and `down_grouped` (one grouped GEMM each),
`MoETiling`, `MoEGemvTiling`, `default_tiling`, `ExpertGroups`, `pack_f16_pairs`,
`swiglu_f16_exponent`, and the plain fp32 torch reference `moe_mxfp4_reference` at the bottom.
"""

from dataclasses import dataclass

import torch
import triton

from tandem.kernels._moe_triton import (
    _combine_kernel,
    _count_kernel,
    _down_kernel,
    _gate_up_swiglu_kernel,
    _route_kernel,
    _router_partial_kernel,
    _scatter_kernel,
)
from tandem.kernels.moe_gemv import (  # noqa: F401 - part of this module's public API
    GEMV_MAX_PAIRS,
    GEMV_MMA_MAX_PAIRS,
    MoEGemvTiling,
    experts_gemv,
    pack_f16_pairs,
    packed_f16_buffers,
    swiglu_f16_exponent,
)
from tandem.kernels.mxfp4 import dequantize_mxfp4

SWIGLU_ALPHA = 1.702


@dataclass(frozen=True)
class MoETiling:
    """Tile sizes of the two grouped GEMMs (the same for both)."""

    block_m: int
    # sorted (token, slot) rows per program; each expert's rows are padded to a multiple
    block_n: int
    # output columns per program
    block_k: int
    # contraction step in elements; a multiple of 32 so whole MXFP4 groups are read
    num_warps: int = 4
    # warps per program
    num_stages: int = 3
    # software-pipelining depth of the K loop
    down_block_n: int | None = None
    # output columns per program of the second GEMM; None: block_n
    down_block_k: int | None = None
    # contraction step of the second GEMM; None: block_k
    down_num_warps: int | None = None
    # warps per program of the second GEMM; None: num_warps
    down_num_stages: int | None = None
    # pipelining depth of the second GEMM; None: num_stages

    def __post_init__(self) -> None:
        sizes = {"block_m": self.block_m, "block_n": self.block_n, "block_k": self.block_k}
        for name in ("down_block_n", "down_block_k"):
            if getattr(self, name) is not None:
                sizes[name] = getattr(self, name)
        for name, value in sizes.items():
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        for name in ("block_k", "down_block_k"):
            value = getattr(self, name)
            if value is not None and value < 32:
                raise ValueError(f"{name} must be >= 32 (one MXFP4 group), got {value}")
        for name in ("num_warps", "down_num_warps"):
            value = getattr(self, name)
            if value is not None and value not in (1, 2, 4, 8, 16):
                raise ValueError(f"{name} must be a power of two <= 16, got {value}")
        for name in ("num_stages", "down_num_stages"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def down(self) -> tuple[int, int, int, int]:
        """(block_n, block_k, num_warps, num_stages) of the second GEMM."""
        return (self.down_block_n or self.block_n, self.down_block_k or self.block_k,
                self.down_num_warps or self.num_warps, self.down_num_stages or self.num_stages)

    @staticmethod
    def for_batch(num_tokens: int, top_k: int, num_experts: int) -> "MoETiling":
        """Rows per program close to the mean rows per expert: little padding when small.

        From sweeps at gpt-oss-20b shapes on an H100 (whole MoE in CUDA-graph replays,
        bench/RESULTS.md): at 128-row blocks a second GEMM twice as wide (T=2048 1584
        against 1654 us, T=8192 5952 against 6323). Decode batches of 256 and 512 (each GEMM
        timed apart, bench/gpu_moe_sweep.py): 64-row blocks, and a second GEMM 128 columns
        wide on 8 warps (T=256 509 against 541 us with 32-row blocks and one tiling for
        both GEMMs; T=512 648 against 667).
        """
        pairs = num_tokens * top_k
        rows_per_expert = -(-pairs // num_experts)
        if 2 * pairs <= num_experts:   # a row or so in a few experts: many narrow programs
            return MoETiling(block_m=16, block_n=32, block_k=256)
        if rows_per_expert <= 16:
            return MoETiling(block_m=16, block_n=64, block_k=128)
        if rows_per_expert <= 128:
            return MoETiling(block_m=64, block_n=64, block_k=64, down_block_n=128,
                             down_num_warps=8)
        return MoETiling(block_m=128, block_n=64, block_k=64, down_block_n=128)


def default_tiling(num_tokens: int, top_k: int, num_experts: int, d_model: int = 2880,
                   d_ff: int = 2880, interpreter: bool = False,
                   half: bool = True) -> "MoETiling | MoEGemvTiling":
    """GEMV for at most GEMV_MAX_PAIRS (token, slot) pairs, else the grouped GEMMs.

    At gpt-oss-20b shapes on an H100 (whole MoE call, CUDA-graph replays): GEMV (16, 256)
    ran T=1 in 66.6 us and T=4 in 176.7 us, within 1% of the best of 18 tilings; at T=8 the
    grouped GEMMs won (290.6 against 317.6 us). block_k shrinks for small layers, where a
    256-wide step would be mostly masked. The CPU interpreter pays per program, not per
    byte: there a tile spans up to 64 outputs.

    bf16/fp16 activations (`half`) on the GPU take the tensor-core GEMVs up to
    GEMV_MMA_MAX_PAIRS: one warp and 16 (GEMV 1) or 8 (GEMV 2) weight rows a program, 16
    groups a load step at T=1 and 8 above (whole MoE over 8 layers' weights, H100: T=1
    41.5 us against 60.6 for the GEMV above, T=4 107 against 169; best of 15 tilings).
    """
    pairs = num_tokens * top_k
    if half and not interpreter and pairs <= GEMV_MMA_MAX_PAIRS:
        return MoEGemvTiling(block_n=8, block_k=128, num_warps=1, tensor_cores=True,
                             step=16 if pairs <= 4 else 8)
    if pairs <= GEMV_MAX_PAIRS:
        widest = triton.next_power_of_2(max(d_model, d_ff))
        return MoEGemvTiling(block_n=64 if interpreter else 16,
                             block_k=max(32, min(256, widest)))
    return MoETiling.for_batch(num_tokens, top_k, num_experts)


@dataclass(frozen=True)
class ExpertGroups:
    """(token, slot) pairs sorted by expert; pair p = token * top_k + slot.

    Row layout of the padded order (BLOCK_M = 4, expert 0 has 3 pairs, expert 2 has 5):

        rows:         0  1  2  3 | 4  5  6  7 | 8  9 10 11 | 12 ...
        pair_ids:     a  b  c  P | d  e  f  g | h  P  P  P | P ...   (P = sentinel T * k)
        block_expert:     0      |     2      |     2      | -1 ...
    """

    pair_ids: torch.Tensor      # [num_blocks * block_m] int32, sentinel num_pairs = padding
    block_expert: torch.Tensor  # [num_blocks] int32, expert of each row block, -1 = unused
    expert_offsets: torch.Tensor  # [E + 1] int32, unpadded start of each expert's pairs
    num_pairs: int              # T * top_k
    block_m: int


ROUTER_SPLITS = 8
"""K splits of the router GEMM: spreads a decode step's few tokens over more programs."""

def route(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor,
          top_k: int, packed_out: tuple[torch.Tensor, torch.Tensor] | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts of each token and their weights (softmax over the selected logits).

    x [T, d], router_weight [E, d], router_bias [E] -> (weights [T, k] fp32,
    experts [T, k] int32, in descending logit order; ties to the lower expert). Logits are
    fp32 sums of exact products. Two launches: the router GEMM split along K, then the
    top-k and softmax. packed_out (packed_f16_buffers(x)): the router GEMM also writes x
    packed for the tensor-core GEMVs (as pack_f16_pairs does; d a multiple of 32).
    """
    num_tokens, d_model = x.shape
    num_experts = router_weight.shape[0]
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=x.device)
    experts = torch.empty((num_tokens, top_k), dtype=torch.int32, device=x.device)
    if num_tokens == 0:
        return weights, experts
    block_t, block_k = 16, 128
    block_e = max(16, triton.next_power_of_2(num_experts))
    num_splits = min(ROUTER_SPLITS, triton.cdiv(d_model, block_k))
    split_len = triton.cdiv(triton.cdiv(d_model, num_splits), block_k) * block_k
    partial = torch.empty((num_splits, num_tokens, block_e), dtype=torch.float32,
                          device=x.device)
    token_blocks = triton.cdiv(num_tokens, block_t)
    _router_partial_kernel[(token_blocks, num_splits)](
        x, router_weight, partial, num_tokens, d_model, num_experts, split_len, x.stride(0),
        router_weight.stride(0), BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k,
        # fp32 dots also in the CPU interpreter, which has no bf16 matmul (numpy): bf16
        # products are exact in fp32, so the logits are the same
        FP32_DOT=(x.dtype == torch.float32 or router_weight.dtype != x.dtype
                  or x.device.type == "cpu"),
        PACK=packed_out is not None, xq_ptr=packed_out[0] if packed_out else x,
        xe_ptr=packed_out[1] if packed_out else x,
    )
    _route_kernel[(token_blocks,)](
        partial, router_bias, weights, experts, num_tokens, num_experts, num_splits,
        TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e, SLOTS=triton.next_power_of_2(top_k),
    )
    return weights, experts


_GROUP_CHUNK = 256
"""Pairs per program of the grouping passes."""


def group_by_expert(experts: torch.Tensor, num_experts: int, block_m: int) -> ExpertGroups:
    """Sort the (token, slot) pairs by expert (stably) and pad each expert to a multiple of
    block_m slots. experts [T, k] int32 -> ExpertGroups. Two launches, no host sync."""
    device = experts.device
    num_pairs = experts.numel()
    flat = experts.reshape(-1).to(torch.int32).contiguous()          # [P]
    # Each expert wastes fewer than block_m slots, so this many blocks always suffice.
    num_blocks = (num_pairs + num_experts * (block_m - 1)) // block_m
    pair_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    num_chunks = max(1, triton.cdiv(num_pairs, _GROUP_CHUNK))
    counts = torch.empty((num_chunks, num_experts), dtype=torch.int32, device=device)
    ranks = torch.empty(max(1, num_pairs), dtype=torch.int32, device=device)
    block_e = max(16, triton.next_power_of_2(num_experts))
    _count_kernel[(num_chunks,)](flat, counts, ranks, num_pairs, num_experts,
                                 BLOCK_P=_GROUP_CHUNK, BLOCK_E=block_e)
    _scatter_kernel[(num_chunks,)](flat, counts, ranks, pair_ids, block_expert, offsets,
                                   num_pairs, num_experts, num_chunks, num_blocks,
                                   BLOCK_P=_GROUP_CHUNK, BLOCK_E=block_e, BLOCK_M=block_m)
    return ExpertGroups(pair_ids, block_expert, offsets, num_pairs, block_m)


def _check_weights(d_model: int, d_ff: int, num_experts: int, gate_up_blocks: torch.Tensor,
                   gate_up_scales: torch.Tensor, down_blocks: torch.Tensor,
                   down_scales: torch.Tensor) -> None:
    if d_model % 32 or d_ff % 32:
        raise ValueError(f"d_model ({d_model}) and d_ff ({d_ff}) must be multiples of 32")
    expected = {
        "gate_up_blocks": (gate_up_blocks, (num_experts, 2 * d_ff, d_model // 32, 16)),
        "gate_up_scales": (gate_up_scales, (num_experts, 2 * d_ff, d_model // 32)),
        "down_blocks": (down_blocks, (num_experts, d_model, d_ff // 32, 16)),
        "down_scales": (down_scales, (num_experts, d_model, d_ff // 32)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape or tensor.dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8 {shape}, got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")


def moe_mxfp4(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor,
              gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor,
              gate_up_bias: torch.Tensor, down_blocks: torch.Tensor, down_scales: torch.Tensor,
              down_bias: torch.Tensor, top_k: int, swiglu_limit: float = 7.0,
              alpha: float = SWIGLU_ALPHA,
              tiling: MoETiling | MoEGemvTiling | None = None) -> torch.Tensor:
    """gpt-oss MoE on packed MXFP4 experts. x [T, d] bf16/fp16/fp32 -> [T, d] like x.

    The SwiGLU activations are stored in x's dtype between the GEMMs; everything else
    accumulates in fp32. fp32 inputs use exact fp32 dots (no tf32). tiling None:
    `default_tiling` (a MoEGemvTiling selects the small-batch path).
    """
    num_tokens, d_model = x.shape
    num_experts = router_weight.shape[0]
    d_ff = gate_up_blocks.shape[1] // 2
    _check_weights(d_model, d_ff, num_experts, gate_up_blocks, gate_up_scales, down_blocks,
                   down_scales)
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if num_tokens == 0:
        return x.new_empty((0, d_model))
    tiling = tiling or default_tiling(num_tokens, top_k, num_experts, d_model, d_ff,
                                      interpreter=x.device.type == "cpu",
                                      half=x.dtype != torch.float32)
    if x.stride(1) != 1:
        x = x.contiguous()  # rows may be strided (a view into a wider buffer); columns not

    gemv_path = isinstance(tiling, MoEGemvTiling)
    packed = packed_f16_buffers(x) if gemv_path and tiling.tensor_cores else None
    route_weights, experts = route(x, router_weight, router_bias, top_k, packed)  # [T, k]
    y = _routed_experts(x, route_weights, experts, gate_up_blocks, gate_up_scales,
                        gate_up_bias, down_blocks, down_scales, down_bias, swiglu_limit, alpha,
                        tiling, packed)                               # [T * k, d] fp32
    return _combine(y, x, top_k)


def experts_mxfp4(x: torch.Tensor, route_weights: torch.Tensor, experts: torch.Tensor,
                  gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor,
                  gate_up_bias: torch.Tensor, down_blocks: torch.Tensor,
                  down_scales: torch.Tensor, down_bias: torch.Tensor,
                  swiglu_limit: float = 7.0, alpha: float = SWIGLU_ALPHA,
                  tiling: MoETiling | MoEGemvTiling | None = None) -> torch.Tensor:
    """The experts of `moe_mxfp4` with the routing given: no router, no combine.

    x [T, d], route_weights [T, k] fp32, experts [T, k] int32 (indices into the given
    experts) -> y [T * k, d] fp32, row p = route_weights of pair p times (W2 act + b2) of
    token p // k's expert in slot p % k. Expert parallelism calls this with k = 1 on the
    (token, slot) pairs routed to the experts one rank holds.
    """
    num_tokens, d_model = x.shape
    num_experts, top_k = gate_up_blocks.shape[0], experts.shape[1]
    d_ff = gate_up_blocks.shape[1] // 2
    _check_weights(d_model, d_ff, num_experts, gate_up_blocks, gate_up_scales, down_blocks,
                   down_scales)
    if num_tokens == 0:
        return torch.empty((0, d_model), dtype=torch.float32, device=x.device)
    tiling = tiling or default_tiling(num_tokens, top_k, num_experts, d_model, d_ff,
                                      interpreter=x.device.type == "cpu",
                                      half=x.dtype != torch.float32)
    if x.stride(1) != 1:
        x = x.contiguous()
    gemv_path = isinstance(tiling, MoEGemvTiling)
    packed = pack_f16_pairs(x) if gemv_path and tiling.tensor_cores else None
    return _routed_experts(x, route_weights.contiguous(), experts.to(torch.int32).contiguous(),
                           gate_up_blocks, gate_up_scales, gate_up_bias, down_blocks,
                           down_scales, down_bias, swiglu_limit, alpha, tiling, packed)


def _routed_experts(x: torch.Tensor, route_weights: torch.Tensor, experts: torch.Tensor,
                    gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor,
                    gate_up_bias: torch.Tensor, down_blocks: torch.Tensor,
                    down_scales: torch.Tensor, down_bias: torch.Tensor, swiglu_limit: float,
                    alpha: float, tiling: MoETiling | MoEGemvTiling,
                    packed: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """GEMV or grouped-GEMM path over routed pairs -> y [T * k, d] fp32, weighted."""
    d_model = x.shape[1]
    num_experts, top_k = gate_up_blocks.shape[0], experts.shape[1]
    d_ff = gate_up_blocks.shape[1] // 2
    if isinstance(tiling, MoEGemvTiling):
        return experts_gemv(x, route_weights, experts, gate_up_blocks, gate_up_scales,
                            gate_up_bias, down_blocks, down_scales, down_bias, d_ff,
                            swiglu_limit, alpha, tiling, packed)     # [T * k, d] fp32
    groups = group_by_expert(experts, num_experts, tiling.block_m)
    act = torch.empty((groups.block_expert.numel() * tiling.block_m, d_ff), dtype=x.dtype,
                      device=x.device)
    gate_up_grouped(x, gate_up_blocks, gate_up_scales, gate_up_bias, act, groups, top_k,
                    swiglu_limit, alpha, tiling.block_n, tiling.block_k, tiling.num_warps,
                    tiling.num_stages)
    y = torch.empty((groups.num_pairs, d_model), dtype=torch.float32, device=x.device)
    down_grouped(act, down_blocks, down_scales, down_bias, route_weights.reshape(-1), y,
                 groups, *tiling.down)
    return y


def _dot_options(x: torch.Tensor) -> dict:
    """The grouped kernels' dot flavour for activations like x."""
    return {
        "DOT_FP32": x.device.type == "cpu",  # the Triton interpreter: no bf16 matmul in numpy
        "DOT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",
        # tl.dot_scaled takes bf16/fp16 activations with the packed weights as they are;
        # fp32 activations keep the in-register decode and exact fp32 dots.
        "SCALED_FORMAT": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(x.dtype, ""),
    }


def gate_up_grouped(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor, act: torch.Tensor, groups: ExpertGroups, top_k: int,
                    swiglu_limit: float, alpha: float, block_n: int, block_k: int,
                    num_warps: int, num_stages: int) -> None:
    """act[row] = SwiGLU(W1 x + b1) of every grouped row (one launch; the first GEMM).
    Public for bench/gpu_moe_sweep.py, which times each GEMM apart."""
    d_model, d_ff = x.shape[1], blocks.shape[1] // 2
    grid = (groups.block_expert.numel(), triton.cdiv(d_ff, block_n))
    _gate_up_swiglu_kernel[grid](
        x, blocks.contiguous(), scales.contiguous(), bias.contiguous(),
        act, groups.pair_ids, groups.block_expert,
        groups.num_pairs, d_model, d_ff, blocks.stride(1), scales.stride(1),
        x.stride(0), act.stride(0), float(swiglu_limit), float(alpha),
        TOP_K=top_k, BLOCK_M=groups.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages, **_dot_options(x),
    )


def down_grouped(act: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor, route_weights: torch.Tensor, y: torch.Tensor,
                 groups: ExpertGroups, block_n: int, block_k: int, num_warps: int,
                 num_stages: int) -> None:
    """y[pair] = weight * (W2 act + b2) of every grouped row (one launch; the second GEMM).
    route_weights [T * k] fp32."""
    d_model, d_ff = blocks.shape[1], act.shape[1]
    grid = (groups.block_expert.numel(), triton.cdiv(d_model, block_n))
    _down_kernel[grid](
        act, blocks.contiguous(), scales.contiguous(), bias.contiguous(),
        route_weights.contiguous(), y, groups.pair_ids, groups.block_expert,
        groups.num_pairs, d_model, d_ff, blocks.stride(1), scales.stride(1),
        act.stride(0), y.stride(0),
        BLOCK_M=groups.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages, **_dot_options(act),
    )


def _combine(y: torch.Tensor, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """y [T * k, d] fp32 -> [T, d] in x's dtype: the sum over each token's k slots."""
    num_tokens, d_model = x.shape
    out = torch.empty((num_tokens, d_model), dtype=x.dtype, device=x.device)
    block_d = 1024
    _combine_kernel[(num_tokens, triton.cdiv(d_model, block_d))](
        y, out, d_model, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK_D=block_d)
    return out


# ---------------------------------------------------------------------------------------
# Reference: plain fp32 torch, dequantising only the experts the batch selects.
# ---------------------------------------------------------------------------------------

def moe_mxfp4_reference(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor,
                        gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor,
                        gate_up_bias: torch.Tensor, down_blocks: torch.Tensor,
                        down_scales: torch.Tensor, down_bias: torch.Tensor, top_k: int,
                        swiglu_limit: float = 7.0, alpha: float = SWIGLU_ALPHA) -> torch.Tensor:
    """fp32 reference of `moe_mxfp4` (GPT_OSS.md 2.5). Returns fp32 [T, d]."""
    xf = x.float()
    logits = xf @ router_weight.float().T + router_bias.float()     # [T, E]
    top_logits, experts = torch.topk(logits, top_k, dim=-1)         # [T, k]
    weights = torch.softmax(top_logits, dim=-1)
    out = torch.zeros_like(xf)
    for expert in torch.unique(experts).tolist():
        token_idx, slot = torch.nonzero(experts == expert, as_tuple=True)
        w1 = dequantize_mxfp4(gate_up_blocks[expert], gate_up_scales[expert])  # [2I, d]
        w2 = dequantize_mxfp4(down_blocks[expert], down_scales[expert])        # [d, I]
        h = xf[token_idx] @ w1.T + gate_up_bias[expert].float()     # [n, 2I]
        gate = h[:, 0::2].clamp(max=swiglu_limit)
        up = h[:, 1::2].clamp(-swiglu_limit, swiglu_limit)
        act = (up + 1.0) * gate * torch.sigmoid(alpha * gate)       # [n, I]
        y = act @ w2.T + down_bias[expert].float()                  # [n, d]
        out.index_add_(0, token_idx, y * weights[token_idx, slot].unsqueeze(-1))
    return out
