"""MoEBackend.expert_pairs, the experts for a routing made elsewhere (what an
expert-parallel rank runs on its experts): TritonMoE (through kernels.moe.experts_mxfp4,
the Triton interpreter on CPU) against TorchMoE, on both kernel paths; and TorchMoE's pairs
summed per token against its own forward."""

from __future__ import annotations

import pytest
import torch

from tandem.workers.model.moe import MoEWeights, TorchMoE, route
from tandem.workers.model.triton_backends import TritonMoE
from tests.support.moe_weights import DEVICE, POISONED_EXPERT, errors, make_weights


def _weights(num_experts: int, seed: int) -> MoEWeights:
    return MoEWeights(**make_weights(num_experts, 64, 64, seed=seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_pairs", [0, 3, 150])  # none, GEMV path, grouped GEMMs
def test_triton_pairs_match_torch(num_pairs: int, dtype: torch.dtype) -> None:
    num_experts = 5
    w = _weights(num_experts, seed=num_pairs)
    gen = torch.Generator().manual_seed(num_pairs)
    # Never the poisoned last expert: its NaN biases would show if its rows were read.
    experts = torch.randint(0, num_experts - 1, (num_pairs,), generator=gen).to(DEVICE)
    weights = torch.rand(num_pairs, generator=gen).to(DEVICE)
    x = torch.randn(num_pairs, 64, generator=gen).to(dtype).to(DEVICE)
    got = TritonMoE().expert_pairs(x, w, experts, weights, 7.0)
    expected = TorchMoE().expert_pairs(x, w, experts, weights, 7.0)
    assert got.shape == (num_pairs, 64) and got.dtype == torch.float32
    if num_pairs:
        max_err, rms_err = errors(got, expected)
        bounds = (2e-5, 5e-6) if dtype == torch.float32 else (2e-2, 8e-3)
        assert max_err < bounds[0] and rms_err < bounds[1], (max_err, rms_err)


def test_torch_pairs_sum_to_forward() -> None:
    w = _weights(6, seed=3)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    experts, weights = route(x, w, top_k=3)  # [T, 3]
    assert not (experts == POISONED_EXPERT % 6).any()
    pairs = TorchMoE().expert_pairs(
        x.repeat_interleave(3, dim=0), w, experts.reshape(-1), weights.reshape(-1), 7.0
    )  # [T * 3, d], pair p = token p // 3
    summed = pairs.view(9, 3, 64).sum(dim=1)
    torch.testing.assert_close(summed, TorchMoE().forward(x, w, 3, 7.0), rtol=1e-5, atol=1e-5)
