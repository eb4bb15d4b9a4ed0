"""RMSNorm of gpt-oss with an optional fused residual add (GPT_OSS.md 2.2).

    h = x + residual            (rounded to x's dtype: the residual stream the model keeps)
    y = weight * h * rsqrt(mean(h^2) + eps)     in fp32, cast to x's dtype

Normalising the rounded h (not the fp32 sum) makes the fused call equal to an add
followed by a norm. One program per row; a row is held in registers whole.

Public: `rmsnorm` and the fp32 torch reference `rmsnorm_reference` at the bottom.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, y_ptr, new_residual_ptr,
    d_model, eps, stride_x, stride_r, stride_y, stride_nr,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < d_model
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        summed = h.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask,
                                            other=0.0).to(tl.float32)
        h = summed.to(new_residual_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_nr + cols, h, mask=mask)
    hf = h.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(hf * hf, axis=0) / d_model + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (hf * inv_rms * weight).to(y_ptr.dtype.element_ty),
             mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d], weight [d], residual [T, d] or None -> (y [T, d], new_residual [T, d]).

    new_residual is x + residual when a residual is given, else x itself (not a copy).
    Outputs have x's dtype.
    """
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"x must be [T, d] and weight [d]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    num_tokens, d_model = x.shape
    y = torch.empty((num_tokens, d_model), dtype=x.dtype, device=x.device)
    new_residual = x if residual is None else torch.empty_like(y)
    if num_tokens == 0:
        return y, new_residual
    block = triton.next_power_of_2(d_model)
    _rmsnorm_kernel[(num_tokens,)](
        x, x if residual is None else residual, weight.contiguous(), y, new_residual,
        d_model, float(eps), x.stride(0),
        0 if residual is None else residual.stride(0), y.stride(0), new_residual.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return y, new_residual


# ---------------------------------------------------------------------------------------
# Reference: plain fp32 torch.
# ---------------------------------------------------------------------------------------

def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                      residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 reference of `rmsnorm`: (y fp32, new_residual in x's dtype)."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    y = weight.float() * hf * torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y, h
