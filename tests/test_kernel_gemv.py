"""Dense one-token GEMV against its fp32 torch reference (CPU: the Triton interpreter)."""

import pytest
import torch

from tandem.kernels.gemv import GemvTiling, gemv, gemv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("num_out", "width", "tiling"), [
    (40, 96, GemvTiling(16, 32, 2)),     # partial last row block and K step
    (64, 64, GemvTiling(8, 64, 1)),
    (33, 100, GemvTiling(32, 128, 4)),   # K below one step, masked
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_matches_reference(num_out: int, width: int, tiling: GemvTiling,
                                dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(num_out + width)
    wide = torch.randn(num_out, width + 8, generator=gen).to(dtype)
    weight = wide[:, :width]                                  # strided rows, as Rows views
    weight[:, :] = torch.randn(num_out, width, generator=gen).to(dtype)
    wide[:, width:] = float("nan")                            # a stray read shows as NaN
    x = torch.randn(1, width, generator=gen).to(dtype)
    bias = torch.randn(num_out, generator=gen).to(dtype)
    for b in (bias, None):
        out = gemv(x.to(DEVICE), weight.to(DEVICE), None if b is None else b.to(DEVICE), tiling)
        assert out.dtype == dtype and out.shape == (1, num_out)
        expected = gemv_reference(x, weight, b)
        bound = 1e-5 if dtype == torch.float32 else 1e-2
        err = (out.float().cpu() - expected).abs().max() / expected.abs().max()
        assert err < bound, err


def test_gemv_rejects_bad_input() -> None:
    w = torch.zeros(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.zeros(2, 16, device=DEVICE), w)
    with pytest.raises(ValueError, match="columns"):
        gemv(torch.zeros(1, 8, device=DEVICE), w)
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.zeros(1, 16, device=DEVICE), w, torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        GemvTiling(block_n=12)
