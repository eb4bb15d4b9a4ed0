"""Paged attention and KV-cache write kernels against fp32 torch references.

Runs through the Triton interpreter on CPU (tests/conftest.py). Unused cache blocks, cache
slots past each sequence's length, block-table padding and entries released in front of a
sliding window all point at NaN, so any stray read turns the output NaN.
"""

import math
from dataclasses import dataclass

import pytest
import torch

from tandem.kernels.attention import (
    AttentionTiling,
    paged_attention,
    paged_attention_reference,
    write_kv,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 8

# (seq_len after the step, new tokens this step) per sequence.
SCENARIOS = {
    "prefill": [(1, 1), (5, 5), (23, 23)],
    "chunked_prefill": [(23, 7), (5, 5), (17, 1)],
    "decode": [(1, 1), (5, 1), (23, 1)],
    "mixed": [(23, 1), (14, 0), (23, 9), (5, 5), (40, 1)],
}


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, D]
    key_cache: torch.Tensor  # [NB, BS, K, D]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, MB] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    sinks: torch.Tensor  # [H] in the batch dtype
    scale: float
    sliding_window: int | None

    def args(self) -> tuple:
        return (
            self.q,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
            self.sinks,
            self.scale,
            self.sliding_window,
        )


def make_batch(
    spec: list[tuple[int, int]],
    window: int | None,
    dtype: torch.dtype,
    seed: int,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    released: str = "poison",
) -> Batch:
    """A cache holding each sequence's context; released: 'poison' points block-table
    entries in front of the window at a NaN block, 'negative' writes -1 there."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-seq_len // BLOCK_SIZE) for seq_len, _ in spec]
    num_blocks = sum(needed) + 3
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    poison_block = physical.pop()
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    block_tables = torch.full((len(spec), max(needed) + 1), poison_block, dtype=torch.int32)
    for b, (seq_len, num_new) in enumerate(spec):
        for j in range(needed[b]):
            block = physical.pop()
            block_tables[b, j] = block
            filled = min(BLOCK_SIZE, seq_len - j * BLOCK_SIZE)
            for cache in (key_cache, value_cache):
                cache[block, :filled] = torch.randn(
                    filled, num_kv_heads, head_dim, generator=gen
                ).to(dtype)
        if window is not None:
            # Blocks wholly before the first new token's window may be given back.
            first_visible = seq_len - num_new - window + 1
            for j in range(max(first_visible, 0) // BLOCK_SIZE):
                key_cache[block_tables[b, j]] = float("nan")
                value_cache[block_tables[b, j]] = float("nan")
                block_tables[b, j] = poison_block if released == "poison" else -1
    num_tokens = sum(n for _, n in spec)
    wide = torch.full((num_tokens, num_heads, head_dim + 8), float("nan"), dtype=dtype)
    wide[..., :head_dim] = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    starts = [0]
    for _, num_new in spec:
        starts.append(starts[-1] + num_new)
    return Batch(
        q=wide.to(DEVICE)[..., :head_dim],
        key_cache=key_cache.to(DEVICE),
        value_cache=value_cache.to(DEVICE),
        block_tables=block_tables.to(DEVICE),
        seq_lens=torch.tensor([s for s, _ in spec], dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        sinks=(2.0 * torch.randn(num_heads, generator=gen)).to(dtype).to(DEVICE),
        scale=1.0 / math.sqrt(head_dim),
        sliding_window=window,
    )


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


def check(batch: Batch, tiling: AttentionTiling | None = None) -> None:
    out = paged_attention(*batch.args(), tiling=tiling)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    max_err, rms_err = errors(out, paged_attention_reference(*batch.args()))
    # fp32: summation order only. bf16: the output is rounded to bf16 (truncated on the CPU
    # interpreter) and, on a GPU, so are the probabilities before the PV product.
    max_bound, rms_bound = (1e-5, 2e-6) if batch.q.dtype == torch.float32 else (2e-2, 8e-3)
    assert max_err < max_bound and rms_err < rms_bound, (max_err, rms_err)


def naive_attention(batch: Batch, spec: list[tuple[int, int]]) -> torch.Tensor:
    """One query and one head at a time in float64, straight from the block table."""
    num_heads, head_dim = batch.q.shape[1:]
    group = num_heads // batch.key_cache.shape[2]
    out = torch.zeros(batch.q.shape, dtype=torch.float64)
    kc, vc = batch.key_cache.cpu().double(), batch.value_cache.cpu().double()
    table, q, sinks = batch.block_tables.cpu(), batch.q.cpu().double(), batch.sinks.cpu()
    token = 0
    for b, (seq_len, num_new) in enumerate(spec):
        for i in range(num_new):
            pos = seq_len - num_new + i
            lo = 0 if batch.sliding_window is None else max(0, pos - batch.sliding_window + 1)
            for h in range(num_heads):
                logits, values = [], []
                for j in range(lo, pos + 1):
                    block, offset = int(table[b, j // BLOCK_SIZE]), j % BLOCK_SIZE
                    logits.append(float(q[token, h] @ kc[block, offset, h // group]) * batch.scale)
                    values.append(vc[block, offset, h // group])
                top = max(logits + [float(sinks[h])])
                weights = [math.exp(s - top) for s in logits]
                total = sum(weights) + math.exp(float(sinks[h]) - top)
                out[token, h] = sum(w * v for w, v in zip(weights, values, strict=True)) / total
            token += 1
    return out


@pytest.mark.parametrize("window", [None, 8])
def test_reference_matches_naive_loop(window: int | None) -> None:
    spec = SCENARIOS["mixed"]
    batch = make_batch(spec, window, torch.float32, seed=1)
    max_err, rms_err = errors(
        paged_attention_reference(*batch.args()), naive_attention(batch, spec)
    )
    assert max_err < 1e-5 and rms_err < 1e-6, (max_err, rms_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_attention_matches_reference(scenario: str, window: int | None, dtype: torch.dtype) -> None:
    check(make_batch(SCENARIOS[scenario], window, dtype, seed=len(scenario)))


@pytest.mark.parametrize(
    "tiling", [AttentionTiling(16, 16, 1), AttentionTiling(16, 16, 4), AttentionTiling(32, 32, 2)]
)
@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("scenario", ["mixed", "decode"])
def test_attention_tilings(scenario: str, window: int | None, tiling: AttentionTiling) -> None:
    # Several key tiles per query tile, key-range splits (some of them empty) and merging.
    check(make_batch(SCENARIOS[scenario], window, torch.float32, seed=3), tiling)


def test_attention_released_blocks_are_minus_one() -> None:
    batch = make_batch(SCENARIOS["mixed"], 8, torch.float32, seed=4, released="negative")
    assert (batch.block_tables == -1).any()
    check(batch, AttentionTiling(16, 16, 2))


def test_attention_odd_head_dim_and_group() -> None:
    # D = 24 pads to 32 lanes; a group of 3 query heads does not divide block_m = 16.
    check(
        make_batch(
            SCENARIOS["mixed"],
            None,
            torch.float32,
            seed=5,
            num_heads=6,
            num_kv_heads=2,
            head_dim=24,
        )
    )
    check(
        make_batch(
            SCENARIOS["chunked_prefill"],
            8,
            torch.bfloat16,
            seed=6,
            num_heads=6,
            num_kv_heads=2,
            head_dim=24,
        ),
        AttentionTiling(16, 16, 2),
    )


def test_attention_zero_tokens() -> None:
    batch = make_batch([(5, 0), (9, 0)], None, torch.float32, seed=7)
    assert paged_attention(*batch.args()).shape == (0, 4, 16)


def test_attention_rejects_bad_arguments() -> None:
    batch = make_batch(SCENARIOS["decode"], None, torch.float32, seed=8)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_attention(
            batch.q,
            batch.key_cache,
            batch.value_cache,
            batch.block_tables,
            batch.seq_lens.long(),
            batch.query_start_loc,
            batch.sinks,
            1.0,
            None,
        )
    with pytest.raises(ValueError, match="num_splits"):
        AttentionTiling(16, 16, 3)
    with pytest.raises(ValueError, match="num_stages"):
        AttentionTiling(16, 16, 1, num_stages=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(9)
    num_blocks, num_kv_heads, head_dim = 4, 2, 16
    key_cache = torch.full(
        (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE
    )
    value_cache = key_cache.clone()
    slots = torch.tensor([17, -1, 0, 31, 8, -1, 9], dtype=torch.int64, device=DEVICE)
    key = torch.randn(7, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    value = torch.randn(7, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    write_kv(key, value, key_cache, value_cache, slots)

    expected_k = torch.full_like(key_cache, float("nan")).view(-1, num_kv_heads, head_dim)
    expected_v = expected_k.clone()
    keep = slots >= 0
    expected_k[slots[keep]] = key[keep]
    expected_v[slots[keep]] = value[keep]
    # equal_nan: untouched slots must still hold exactly the NaN they started with.
    assert torch.equal(key_cache.view_as(expected_k).isnan(), expected_k.isnan())
    assert torch.allclose(key_cache.view_as(expected_k), expected_k, rtol=0, atol=0, equal_nan=True)
    assert torch.allclose(
        value_cache.view_as(expected_v), expected_v, rtol=0, atol=0, equal_nan=True
    )
    write_kv(key[:0], value[:0], key_cache, value_cache, slots[:0])  # zero tokens: no launch
