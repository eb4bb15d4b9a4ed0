"""Rotary embedding kernel against the model's torch path and an fp32 reference.

On CPU the kernel runs through the Triton interpreter (tests/conftest.py); on a GPU,
compiled (`pytest --noconftest`). q and k are views into one fused qkv buffer with NaN
columns between the parts, so a stray write or a read of the wrong column shows.
"""

import math

import pytest
import torch

from tandem.kernels.rope import rotary_embedding_, rotary_embedding_reference
from tandem.workers.model.attention import TorchPagedAttention
from tandem.workers.model.config import YarnScaling
from tandem.workers.model.layers import (
    RotaryBackend,
    SelfAttention,
    TorchRotary,
    apply_rotary,
    rotary_inv_freq,
)
from tandem.workers.model.triton_backends import TritonPagedAttention
from tandem.workers.synthetic.tiny_model import TINY_CONFIG

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPT_OSS_YARN = YarnScaling(32.0, 32.0, 1.0, 4096, truncate=False)
PAD = 3  # NaN columns after q, after k and after v in the fused buffer


def yarn_tables(positions: torch.Tensor, head_dim: int,
                scaling: YarnScaling | None = GPT_OSS_YARN,
                theta: float = 150000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D/2] float32 with the mscale, computed as the model's RotaryEmbedding."""
    inv_freq, mscale = rotary_inv_freq(head_dim, theta, scaling)
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return angles.cos() * mscale, angles.sin() * mscale


def fused_qkv(num_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(buffer [T, (H + 2K) D + 3 PAD], q [T, H, D] view, k [T, K, D] view); the PAD columns
    after each part are NaN."""
    gen = torch.Generator().manual_seed(seed)
    q_cols, kv_cols = heads * head_dim, kv_heads * head_dim
    width = q_cols + 2 * kv_cols + 3 * PAD
    buffer = (torch.randn(num_tokens, width, generator=gen) * 3).to(dtype)
    k_start = q_cols + PAD
    for start in (q_cols, k_start + kv_cols, width - PAD):
        buffer[:, start:start + PAD] = float("nan")
    buffer = buffer.to(DEVICE)
    q = buffer[:, :q_cols].view(num_tokens, heads, head_dim)
    k = buffer[:, k_start:k_start + kv_cols].view(num_tokens, kv_heads, head_dim)
    return buffer, q, k


def assert_within_one_step(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Each element equal or one rounding step of actual's dtype away (the CPU interpreter
    truncates to bf16 where a GPU rounds to nearest)."""
    info = torch.finfo(actual.dtype)
    step = expected.abs() * info.eps + info.tiny  # tiny: subnormal outputs
    diff = (actual.float() - expected).abs()
    assert (diff <= step).all(), diff.max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("num_tokens", "heads", "kv_heads", "head_dim"),
    [(1, 4, 2, 16), (7, 3, 1, 10), (5, 40, 2, 8)],  # 40 heads: several q tiles
)
def test_rope_matches_model_path(num_tokens: int, heads: int, kv_heads: int, head_dim: int,
                                 dtype: torch.dtype) -> None:
    buffer, q, k = fused_qkv(num_tokens, heads, kv_heads, head_dim, dtype, seed=num_tokens)
    positions = torch.tensor([0, 1, 4095, 4096, 70000, 131071, 9][:num_tokens], device=DEVICE)
    cos, sin = yarn_tables(positions, head_dim)
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    ref_q, ref_k = rotary_embedding_reference(q, k, cos, sin)
    before = buffer.clone()

    rotary_embedding_(q, k, cos, sin)

    # Only q's and k's columns change: v and the NaN padding are bit-identical.
    changed = torch.zeros(buffer.shape[1], dtype=torch.bool)
    changed[: heads * head_dim] = True
    k_start = heads * head_dim + PAD
    changed[k_start: k_start + kv_heads * head_dim] = True
    assert torch.equal(buffer[:, ~changed].cpu().view(torch.uint8),
                       before[:, ~changed].cpu().view(torch.uint8))
    assert torch.isfinite(q).all() and torch.isfinite(k).all()
    if dtype == torch.float32 or DEVICE == "cuda":
        # Same tables, products and differences rounded one by one, one cast: bit-equal.
        assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert_within_one_step(q, ref_q)
    assert_within_one_step(k, ref_k)


def test_rope_is_half_split_rotation() -> None:
    """Independent of both torch paths: D = 4 rotates the pairs (x0, x2) and (x1, x3) by
    p * inv_freq_i (not the interleaved pairs (x0, x1), (x2, x3)), scaled by the tables."""
    angles = [0.3, -1.1]
    q = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], device=DEVICE)     # [T=1, H=1, D=4]
    k = torch.tensor([[[-0.5, 0.25, 2.0, 1.0]]], device=DEVICE)
    scale = 1.25
    cos = torch.tensor([[scale * math.cos(a) for a in angles]], device=DEVICE)
    sin = torch.tensor([[scale * math.sin(a) for a in angles]], device=DEVICE)

    def rotated(x: list[float]) -> list[float]:
        out = list(x)
        for i, a in enumerate(angles):
            c, s = scale * math.cos(a), scale * math.sin(a)
            out[i], out[i + 2] = x[i] * c - x[i + 2] * s, x[i + 2] * c + x[i] * s
        return out

    expected_q, expected_k = rotated(q[0, 0].tolist()), rotated(k[0, 0].tolist())
    rotary_embedding_(q, k, cos, sin)
    torch.testing.assert_close(q[0, 0].cpu().double(), torch.tensor(expected_q).double(),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k[0, 0].cpu().double(), torch.tensor(expected_k).double(),
                               rtol=1e-6, atol=1e-6)


def test_rope_separate_tensors_and_padded_tables() -> None:
    """q and k from two buffers with different token strides; cos / sin rows strided."""
    gen = torch.Generator().manual_seed(7)
    num_tokens, head_dim = 6, 16
    q = torch.randn(num_tokens, 5, head_dim, generator=gen).to(DEVICE)
    k_wide = torch.randn(num_tokens, 3, head_dim + 4, generator=gen).to(DEVICE)
    k = k_wide[:, :, :head_dim]                      # token stride 60, head stride 20
    positions = torch.arange(100, 100 + num_tokens, device=DEVICE)
    cos, sin = yarn_tables(positions, head_dim, scaling=None, theta=10000.0)
    cos_wide = torch.full((num_tokens, head_dim), float("nan"), device=DEVICE)
    cos_wide[:, : head_dim // 2] = cos
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    rotary_embedding_(q, k, cos_wide[:, : head_dim // 2], sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.isfinite(k_wide).all()


def test_rope_zero_tokens_and_bad_arguments() -> None:
    empty = torch.empty(0, 4, 16, device=DEVICE)
    rotary_embedding_(empty, torch.empty(0, 2, 16, device=DEVICE),
                      torch.empty(0, 8, device=DEVICE), torch.empty(0, 8, device=DEVICE))
    q, k = torch.zeros(2, 4, 16, device=DEVICE), torch.zeros(2, 2, 16, device=DEVICE)
    table = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cos"):
        rotary_embedding_(q, k, table.double(), table)
    with pytest.raises(ValueError, match="sin"):
        rotary_embedding_(q, k, table, torch.zeros(3, 8, device=DEVICE))
    with pytest.raises(ValueError, match="k must be"):
        rotary_embedding_(q, torch.zeros(2, 2, 8, device=DEVICE), table, table)
    with pytest.raises(ValueError, match="unit-stride"):
        rotary_embedding_(q.transpose(1, 2).contiguous().transpose(1, 2), k, table, table)
    with pytest.raises(ValueError, match="even"):
        rotary_embedding_(torch.zeros(2, 4, 5, device=DEVICE), torch.zeros(2, 2, 5,
                          device=DEVICE), table, table)


def test_self_attention_takes_rotary_from_its_backend() -> None:
    """The Triton attention backend rotates (in place, bit-equal to torch in fp32); the
    torch backend leaves SelfAttention on TorchRotary."""
    triton_backend = TritonPagedAttention()
    assert isinstance(triton_backend, RotaryBackend)
    layer = SelfAttention(TINY_CONFIG, 0, triton_backend, torch.float32, DEVICE)
    assert layer.rotary is triton_backend
    torch_layer = SelfAttention(TINY_CONFIG, 0, TorchPagedAttention(), torch.float32, DEVICE)
    assert isinstance(torch_layer.rotary, TorchRotary)

    head_dim = TINY_CONFIG.head_dim
    _, q, k = fused_qkv(9, TINY_CONFIG.num_attention_heads, TINY_CONFIG.num_key_value_heads,
                        head_dim, torch.float32, seed=2)
    positions = torch.arange(20, 29, device=DEVICE)
    cos, sin = yarn_tables(positions, head_dim, TINY_CONFIG.rope_scaling,
                           TINY_CONFIG.rope_theta)
    want_q, want_k = TorchRotary().rotate(q, k, cos, sin)
    got_q, got_k = layer.rotary.rotate(q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


# ---------------------------------------------------------------------------------------
# gpt-oss-20b shapes on the GPU: H 64, K 8, D 64, bf16, positions up to 131071.
# ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need a GPU")
@pytest.mark.parametrize("num_tokens", [1, 64, 256, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_gpt_oss_20b_shapes(num_tokens: int, dtype: torch.dtype) -> None:
    buffer, q, k = fused_qkv(num_tokens, 64, 8, 64, dtype, seed=num_tokens)
    gen = torch.Generator().manual_seed(num_tokens)
    positions = torch.randint(0, 131072, (num_tokens,), generator=gen).to("cuda")
    cos, sin = yarn_tables(positions, 64)
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    ref_q, ref_k = rotary_embedding_reference(q, k, cos, sin)
    v_before = buffer[:, 64 * 64 + 8 * 64 + 2 * PAD:].clone()
    rotary_embedding_(q, k, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert_within_one_step(q, ref_q)
    assert_within_one_step(k, ref_k)
    assert torch.equal(buffer[:, 64 * 64 + 8 * 64 + 2 * PAD:].view(torch.uint8),
                       v_before.view(torch.uint8))
