"""Dense GEMV for one token: y [1, N] = x [1, K] W[N, K]^T (+ b), bf16/fp16 weights.

A batch-1 decode step reads every attention projection once for one row of activations;
cuBLAS runs these split-K at about 75% of HBM bandwidth on an H100 (plus a reduce
launch). Here a program owns BLOCK_N output rows and walks K in BLOCK_K steps, keeping
[BLOCK_N, BLOCK_K] fp32 partial products in registers and summing them once at the end:
each step is wide vector loads and one FMA a weight, nothing else.

Public: `gemv`, `GemvTiling`, and the fp32 torch reference `gemv_reference`.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvTiling:
    """Work split: BLOCK_N output rows a program, K walked BLOCK_K at a time."""

    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 1

    @staticmethod
    def for_shape(num_out: int, width: int) -> "GemvTiling":
        """Best of 54 tilings on an H100 at gpt-oss shapes, over 24 layers' weights (so
        from HBM): q/k/v (5120 x 2880) 8 rows, 512-wide steps, 4 warps: 12.2 us (cuBLAS
        13.1); o_proj (2880 x 4096) and lm_head (201088 x 2880) 4 rows, 1024-wide, 2 warps:
        10.1 us (cuBLAS 14.4 with its split-K reduce) and 367 us (cuBLAS 407)."""
        if width >= 4096 or num_out >= 65536:
            return GemvTiling(4, 1024, 2)
        return GemvTiling(8, 512, 4)

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < N
    offs = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_w + offs[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = k0 + offs < K
        w = tl.load(w_ptrs + k0, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        x = tl.load(x_ptr + k0 + offs, mask=k_valid, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_valid, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_valid)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         tiling: GemvTiling | None = None) -> torch.Tensor:
    """x [1, K] @ weight[N, K]^T + bias [N] -> [1, N] in x's dtype; fp32 accumulation.

    weight rows may be strided (a view into a wider tensor); its columns, x and bias must
    be contiguous.
    """
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"gemv takes one row of activations [1, K], got {tuple(x.shape)}")
    num_out, width = weight.shape
    if x.shape[1] != width:
        raise ValueError(f"x has {x.shape[1]} columns, weight {width}")
    if bias is not None and tuple(bias.shape) != (num_out,):
        raise ValueError(f"bias must be [{num_out}], got {tuple(bias.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("weight columns must be contiguous")
    tiling = tiling or GemvTiling.for_shape(num_out, width)
    x = x.contiguous()
    y = torch.empty((1, num_out), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(num_out, tiling.block_n),)](
        x, weight, bias if bias is not None else x, y, num_out, width, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
    )
    return y


def gemv_reference(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 torch reference of `gemv`: [T, N] fp32."""
    y = x.float() @ weight.float().T
    return y if bias is None else y + bias.float()
