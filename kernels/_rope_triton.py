"""Triton code of the rotary embedding (private; see kernels/rope.py).

The grid is (tokens, head tiles). Head tiles 0 .. cdiv(H, BLOCK_H) - 1 cover the query heads
of the token, the rest its key heads, so q and k go through one launch:

    program (t, j)   j < q_tiles:  q[t, j*BLOCK_H : (j+1)*BLOCK_H, :]
                     otherwise:    k[t, (j-q_tiles)*BLOCK_H : ..., :]

Each program loads the two halves of its heads, rotates them in fp32 with the token's cos
and sin, and stores them back where they came from; every element is read and written by
one program only, so the rotation is safe in place.
"""

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr, first_head, num_heads, stride_h, cos, sin, half,
    BLOCK_H: tl.constexpr, HALF_D: tl.constexpr,
):
    """Rotates heads [first_head, first_head + BLOCK_H) of one token row at x_ptr."""
    heads = first_head + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF_D)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < half)
    ptrs = x_ptr + heads[:, None].to(tl.int64) * stride_h + dims[None, :]   # [BLOCK_H, HALF_D]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + half, mask=mask, other=0.0).to(tl.float32)
    # Products and difference rounded one by one (the launch turns FMA contraction off), as
    # the torch path computes them: the result is bit-equal to it in fp32.
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    dtype = x_ptr.dtype.element_ty
    tl.store(ptrs, out1.to(dtype, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(ptrs + half, out2.to(dtype, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _rope_qk_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr,
    num_q_heads, num_k_heads, half,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    BLOCK_H: tl.constexpr, HALF_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    dims = tl.arange(0, HALF_D)
    cos = tl.load(cos_ptr + token * stride_cos + dims, mask=dims < half, other=0.0)
    sin = tl.load(sin_ptr + token * stride_sin + dims, mask=dims < half, other=0.0)
    q_tiles = tl.cdiv(num_q_heads, BLOCK_H)
    if tile < q_tiles:
        _rotate_heads(q_ptr + token * stride_qt, tile * BLOCK_H, num_q_heads, stride_qh,
                      cos, sin, half, BLOCK_H, HALF_D)
    else:
        _rotate_heads(k_ptr + token * stride_kt, (tile - q_tiles) * BLOCK_H, num_k_heads,
                      stride_kh, cos, sin, half, BLOCK_H, HALF_D)
