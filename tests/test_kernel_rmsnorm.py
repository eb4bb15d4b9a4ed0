"""RMSNorm kernel (with and without the fused residual add) against fp32 torch."""

import math

import pytest
import torch

from tandem.kernels.rmsnorm import rmsnorm, rmsnorm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error / max |expected|, rms error / rms expected); NaN anywhere -> inf."""
    a, e = actual.double().cpu(), expected.double().cpu()
    if not torch.isfinite(a).all():
        return math.inf, math.inf
    diff = a - e
    return ((diff.abs().max() / e.abs().max()).item(),
            (diff.pow(2).mean().sqrt() / e.pow(2).mean().sqrt()).item())


def strided_rows(num_tokens: int, d_model: int, dtype: torch.dtype,
                 gen: torch.Generator) -> torch.Tensor:
    """[T, d] view into a wider NaN buffer, with a large offset so scales differ per row."""
    wide = torch.full((num_tokens, d_model + 7), float("nan"), dtype=dtype)
    rows = torch.randn(num_tokens, d_model, generator=gen) * torch.rand(num_tokens, 1,
                                                                          generator=gen) * 10
    wide[:, :d_model] = (rows + 0.5).to(dtype)
    return wide.to(DEVICE)[:, :d_model]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (3, 100), (17, 2880)])
def test_rmsnorm_matches_reference(shape: tuple[int, int], with_residual: bool,
                                   dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(shape[0] * 2 + with_residual)
    x = strided_rows(*shape, dtype, gen)
    residual = strided_rows(*shape, dtype, gen) if with_residual else None
    weight = (1.0 + torch.randn(shape[1], generator=gen)).to(DEVICE, dtype)
    y, new_residual = rmsnorm(x, weight, 1e-5, residual)
    y_ref, residual_ref = rmsnorm_reference(x, weight, 1e-5, residual)
    assert y.dtype == dtype and new_residual.dtype == dtype
    # The summed residual is one rounding of the exact sum: bit-equal in fp32. In bf16 the
    # CPU interpreter truncates where a GPU rounds to nearest, so allow one bf16 step (2^-7).
    if dtype == torch.float32:
        assert torch.equal(new_residual.cpu(), residual_ref.cpu())
    else:
        step = residual_ref.float().abs() * 2.0**-7
        assert ((new_residual.float() - residual_ref.float()).abs() <= step).all()
    max_err, rms_err = errors(y, y_ref)
    # bf16: one rounding of the output (truncation on the CPU interpreter: up to 2^-7).
    max_bound, rms_bound = (1e-6, 2e-7) if dtype == torch.float32 else (1.6e-2, 6e-3)
    assert max_err < max_bound and rms_err < rms_bound, (max_err, rms_err)


def test_rmsnorm_without_residual_returns_input() -> None:
    x = torch.randn(3, 64, device=DEVICE)
    _, new_residual = rmsnorm(x, torch.ones(64, device=DEVICE), 1e-5)
    assert new_residual is x


def test_rmsnorm_independent_formula() -> None:
    # y = w * x / sqrt(mean(x^2) + eps) written out for one row in float64.
    x = torch.tensor([[3.0, -4.0, 0.0, 1.0]], device=DEVICE)
    w = torch.tensor([1.0, 2.0, 3.0, 0.5], device=DEVICE)
    y, _ = rmsnorm(x, w, 1e-5)
    denom = math.sqrt((9 + 16 + 0 + 1) / 4 + 1e-5)
    expected = [3.0 / denom, -8.0 / denom, 0.0, 0.5 / denom]
    assert torch.allclose(y.cpu().double(), torch.tensor([expected], dtype=torch.float64),
                          rtol=1e-6, atol=0)


def test_rmsnorm_zero_tokens_and_bad_shapes() -> None:
    y, r = rmsnorm(torch.empty(0, 64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-5,
                   torch.empty(0, 64, device=DEVICE))
    assert y.shape == (0, 64) and r.shape == (0, 64)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(torch.zeros(2, 64, device=DEVICE), torch.ones(32, device=DEVICE), 1e-5)
