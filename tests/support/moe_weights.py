"""MoE test data shared by the kernel and backend tests: random experts packed as in the
checkpoint with one poisoned expert, NaN-poisoned activation rows, normalised errors."""

from __future__ import annotations

import math

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POISONED_EXPERT = -1  # never routed to; its biases are NaN so any use of it shows


def make_weights(num_experts: int, d_model: int, d_ff: int, seed: int) -> dict[str, torch.Tensor]:
    """Random packed experts as in the checkpoint (every nibble value, varied scales)."""
    gen = torch.Generator().manual_seed(seed)

    def packed(e: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)
        scales = torch.randint(120, 125, (e, rows, cols // 32), generator=gen, dtype=torch.uint8)
        return blocks, scales

    gate_up_blocks, gate_up_scales = packed(num_experts, 2 * d_ff, d_model)
    down_blocks, down_scales = packed(num_experts, d_model, d_ff)
    weights = {
        "router_weight": torch.randn(num_experts, d_model, generator=gen) / math.sqrt(d_model),
        "router_bias": torch.randn(num_experts, generator=gen),
        "gate_up_blocks": gate_up_blocks,
        "gate_up_scales": gate_up_scales,
        # Wide biases push some gate/up values past the +-7 clamp.
        "gate_up_bias": 3.0 * torch.randn(num_experts, 2 * d_ff, generator=gen),
        "down_blocks": down_blocks,
        "down_scales": down_scales,
        "down_bias": torch.randn(num_experts, d_model, generator=gen),
    }
    weights["router_bias"][POISONED_EXPERT] = -1e4
    weights["gate_up_bias"][POISONED_EXPERT] = float("nan")
    weights["down_bias"][POISONED_EXPERT] = float("nan")
    weights["gate_up_scales"][POISONED_EXPERT] = 254
    return {name: t.to(DEVICE) for name, t in weights.items()}


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error / max |expected|, rms error / rms expected); NaN anywhere -> inf."""
    a, e = actual.double().cpu(), expected.double().cpu()
    if not torch.isfinite(a).all():
        return math.inf, math.inf
    diff = a - e
    return (
        (diff.abs().max() / e.abs().max()).item(),
        (diff.pow(2).mean().sqrt() / e.pow(2).mean().sqrt()).item(),
    )


def poisoned_rows(num_tokens: int, d_model: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """x [T, d] as a view into a wider NaN-filled buffer: reads past column d show as NaN."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.full((num_tokens, d_model + 32), float("nan"), dtype=dtype)
    wide[:, :d_model] = torch.randn(num_tokens, d_model, generator=gen).to(dtype)
    return wide.to(DEVICE)[:, :d_model]
