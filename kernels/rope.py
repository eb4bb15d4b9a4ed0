"""Rotary embedding of gpt-oss on q and k, in place, in one launch (GPT_OSS.md 2.3, 2.4).

Half-split (NeoX, rotate-half) style over the whole head, not interleaved pairs:

    x1 = x[..., :D/2]   x2 = x[..., D/2:]
    x1' = x1 cos - x2 sin          x2' = x2 cos + x1 sin          in fp32, cast to x's dtype

cos and sin come in per token, [T, D/2] float32, already multiplied by the YaRN mscale
(the model computes them once per step from the positions and shares them across all
layers). Taking them as input rather than evaluating cos(p * inv_freq) in the kernel keeps
the kernel bit-equal to the torch path: the same tables, the same fp32 products and
differences rounded one by one (FMA contraction is off for this launch), one rounding to
x's dtype. The per-step cost of the tables is a few [T, D/2] elementwise ops for all layers.

q and k may be strided views (for example slices of one fused qkv projection output
[T, (H + 2K) D]): only the head dimension must be unit-stride. They are rotated where they
are; no copies.

Public: `rotary_embedding_` and the fp32 torch reference `rotary_embedding_reference` at
the bottom.
"""

import torch
import triton

from tandem.kernels._rope_triton import _rope_qk_kernel

# Elements of one half (head tile x D/2) a program rotates; 16 heads of a 64-wide head.
_TILE_ELEMENTS = 512


def _check_heads(name: str, x: torch.Tensor, num_tokens: int, head_dim: int) -> None:
    if x.dim() != 3 or x.shape[0] != num_tokens or x.shape[2] != head_dim:
        raise ValueError(f"{name} must be [T={num_tokens}, heads, D={head_dim}], "
                         f"got {tuple(x.shape)}")
    if x.stride(2) != 1:
        raise ValueError(f"{name} must be unit-stride in D, got strides {x.stride()}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {x.dtype}")


def rotary_embedding_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> None:
    """Rotates q [T, H, D] and k [T, K, D] in place with cos, sin [T, D/2] float32.

    q and k may have any token and head strides (views of one buffer are fine) but must
    not overlap each other; D must be even.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D], got {tuple(q.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    _check_heads("q", q, num_tokens, head_dim)
    _check_heads("k", k, num_tokens, head_dim)
    half = head_dim // 2
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (num_tokens, half) or table.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [T={num_tokens}, D/2={half}], got "
                             f"{table.dtype} {tuple(table.shape)}")
        if table.stride(1) != 1:
            raise ValueError(f"{name} must be unit-stride in D/2, got strides {table.stride()}")
    if q.device != k.device or cos.device != q.device or sin.device != q.device:
        raise ValueError("q, k, cos and sin must be on one device")
    num_k_heads = k.shape[1]
    if num_tokens == 0 or num_q_heads + num_k_heads == 0:
        return
    half_block = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(num_q_heads, num_k_heads)),
                  max(1, _TILE_ELEMENTS // half_block))
    tiles = triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_k_heads, block_h)
    _rope_qk_kernel[(num_tokens, tiles)](
        q, k, cos, sin,
        num_q_heads, num_k_heads, half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        BLOCK_H=block_h, HALF_D=half_block,
        num_warps=4 if block_h * half_block >= 512 else 1,
        enable_fp_fusion=False,
    )


# ---------------------------------------------------------------------------------------
# Reference: plain fp32 torch.
# ---------------------------------------------------------------------------------------

def rotary_embedding_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 reference of `rotary_embedding_`: (q', k') float32, inputs untouched."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()        # [T, heads, D/2]
        c, s = cos.float()[:, None, :], sin.float()[:, None, :]      # [T, 1, D/2]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    return rotate(q), rotate(k)
