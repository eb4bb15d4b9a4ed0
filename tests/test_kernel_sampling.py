"""Sampling kernel against the torch path of workers/engine/sampler.py and its own reference.

Runs through the Triton interpreter on CPU (tests/conftest.py) with tiny vocabularies and
tilings small enough that rows span several chunks; the GPU tests run the real vocabulary
(201,088) at batch 1..256 with the default tiling (`pytest --noconftest` on the GPU host).

Exact token ids are compared. fp32 rounding may legitimately decide a top-p or min-p
boundary or a race between two nearly equal scores (kernels/sampling.py), so the random rows
are built away from those knife edges: logits on a 1/8 grid (exact ties, distinct values far
apart), top_p between two cumulative masses of the nucleus groups and min_p between two
group probabilities, both computed in float64 here. Ties at every threshold stay in.

Which tokens a row keeps is read off the kernel with the noise: row copy v gets a draw of
1e-30 at token v and 1 elsewhere, so it returns v exactly when v is kept.
"""

import math
import random
from dataclasses import dataclass

import pytest
import torch

from tandem.kernels.sampling import (
    SamplingTiling,
    sample_tokens,
    sample_tokens_reference,
    search_passes,
)
from tandem.workers.engine.sampler import kernel_sample, race_winners, sampling_probs
from tandem.workers.engine.sampling_params import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
# Several chunks and several steps per chunk on tiny rows (CPU); the default on the GPU.
SMALL = SamplingTiling(chunk=256, block=128)
GPT_OSS_VOCAB = 201_088


@dataclass(frozen=True)
class Rows:
    """A batch for `sample_tokens`, with the params the torch path takes."""

    logits: torch.Tensor  # [B, V] fp32
    noise: torch.Tensor  # [B, V] fp32 Exp(1)
    params: list[SamplingParams]  # temperature 0 rows are greedy

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every per-row tensor given, with the steps a row does not use switched off."""
        device = self.logits.device
        return {
            "temperature": torch.tensor(
                [p.temperature for p in self.params], dtype=torch.float32, device=device
            ),
            "top_k": torch.tensor([p.top_k for p in self.params], dtype=torch.int32, device=device),
            "top_p": torch.tensor(
                [p.top_p for p in self.params], dtype=torch.float32, device=device
            ),
            "min_p": torch.tensor(
                [p.min_p for p in self.params], dtype=torch.float32, device=device
            ),
        }


def torch_path(rows: Rows) -> torch.Tensor:
    """workers/engine/sampler.py's torch path on the same noise (greedy rows: argmax)."""
    out = rows.logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(rows.params) if not p.is_greedy]
    if random_rows:
        index = torch.tensor(random_rows, device=rows.logits.device)
        probs = sampling_probs(rows.logits[index], [rows.params[i] for i in random_rows])
        out[index] = race_winners(probs, rows.noise[index])
    return out


def grid_logits(gen: torch.Generator, batch: int, vocab: int, spread: float) -> torch.Tensor:
    """[B, V] logits on a 1/8 grid: many exact ties, distinct values 1/8 apart; some -inf."""
    logits = torch.round(torch.randn(batch, vocab, generator=gen) * spread * 8) / 8
    holes = torch.rand(batch, vocab, generator=gen) < 0.05
    return logits.masked_fill(holes, -math.inf)


def _groups(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct finite values of a float64 row, descending, and how many tokens hold each."""
    distinct, counts = torch.unique(values[torch.isfinite(values)], return_counts=True)
    return distinct.flip(0), counts.flip(0)


def random_params(logits_row: torch.Tensor, rng: random.Random) -> SamplingParams:
    """Params mixing every step, with top_p and min_p placed between two groups (float64)."""
    vocab = logits_row.numel()
    temperature = rng.choice([0.0, 1e-3, 0.3, 1.0, 1.0, 2.5, 60.0])
    if temperature == 0.0:
        return SamplingParams(temperature=0.0)
    top_k = rng.choice([0, 0, 1, 2, 7, 40, vocab - 1, vocab, vocab + 5])
    # s exactly as the kernel and the torch path compute it: fp32 logits / fp32 temperature.
    s = (logits_row.cpu() / torch.tensor(temperature, dtype=torch.float32)).double()
    if 0 < top_k < vocab:
        kth = s.sort(descending=True).values[top_k - 1]
        s = s.masked_fill(s < kth, -math.inf)
    distinct, counts = _groups(s)
    e = torch.exp(distinct - distinct[0])  # [G] float64, 1 for the top group
    mass = (e * counts).cumsum(0) / (e * counts).sum()  # cumulative mass at each group's end
    top_p = 1.0
    choice = rng.random()
    if choice < 0.15:
        top_p = 1e-7  # the top group only
    elif choice < 0.7 and len(distinct) > 1:
        j = rng.randrange(len(distinct) - 1)
        low = mass[j - 1].item() if j > 0 else 0.0
        # Only where fp32 can tell the boundary from its neighbours: at a cumulative mass of
        # 1 - 1e-15 (a cold temperature's tail) top_p rounds to 1.0 and fp32 cumulative sums
        # land on either side of it by summation order alone (torch's own CPU and CUDA
        # paths disagree there; so did this test on an H100).
        if mass[j].item() - low > 1e-5 and mass[j].item() < 1 - 1e-5:
            top_p = (low + mass[j].item()) / 2  # keeps groups 0..j
            e = e[: j + 1]
    min_p = 0.0
    e = e[e > 1e-30]  # min_p stays clear of fp32 subnormals and of underflowed tokens
    if rng.random() < 0.4 and len(e) > 1:
        j = rng.randrange(len(e) - 1)
        min_p = math.sqrt(e[j].item() * e[j + 1].item())  # keeps groups with e >= e[j]
    elif rng.random() < 0.1:
        min_p = 1.0
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def random_rows(seed: int, batch: int, vocab: int, device: str) -> Rows:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    logits = grid_logits(gen, batch, vocab, spread=rng.choice([1.0, 2.0, 4.0]))
    # One row with only three finite logits, tied at the top.
    logits[0, :] = -math.inf
    logits[0, [3, vocab // 2, vocab - 1]] = 2.0
    noise = torch.empty(batch, vocab).exponential_(generator=gen)
    params = [random_params(row, rng) for row in logits]
    return Rows(logits.to(device), noise.to(device), params)


def kept_sets(logits_row: torch.Tensor, cases: list[SamplingParams]) -> list[list[int]]:
    """The tokens the kernel keeps for one row under each params (module docstring), all
    cases in one batch of V rows each."""
    vocab = logits_row.numel()
    noise = torch.ones(vocab, vocab, device=logits_row.device)
    noise.fill_diagonal_(1e-30)
    rows = Rows(
        logits_row.expand(vocab * len(cases), -1).contiguous(),
        noise.repeat(len(cases), 1),
        [params for params in cases for _ in range(vocab)],
    )
    tokens = sample_tokens(rows.logits, rows.noise, **rows.tensors(), tiling=SMALL).tolist()
    return [
        [v for v in range(vocab) if tokens[case * vocab + v] == v] for case in range(len(cases))
    ]


# ---- against the torch path, row by row -------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_rows_match_torch_path(seed: int) -> None:
    rows = random_rows(seed, batch=12, vocab=600, device=DEVICE)
    expected = torch_path(rows)
    got = sample_tokens(rows.logits, rows.noise, **rows.tensors(), tiling=SMALL)
    assert got.dtype == torch.int64
    assert got.tolist() == expected.tolist(), rows.params
    reference = sample_tokens_reference(rows.logits, rows.noise, **rows.tensors())
    assert reference.tolist() == expected.tolist()


def test_kernel_sample_leaves_unused_steps_out() -> None:
    # Through workers/engine/sampler.py's entry: top_k, top_p, min_p tensors are None when no row
    # uses them, with the default tiling (one chunk here).
    rows = random_rows(3, batch=6, vocab=300, device=DEVICE)
    plain = [SamplingParams(temperature=p.temperature or 1.0) for p in rows.params]
    only_top_p = [SamplingParams(top_p=0.5, temperature=0.7)] * len(rows.params)
    for params in (plain, only_top_p):
        case = Rows(rows.logits, rows.noise, params)
        assert kernel_sample(case.logits, case.noise, params).tolist() == (
            torch_path(case).tolist()
        )


@pytest.mark.parametrize("probes", [2, 16])
def test_search_width(probes: int) -> None:
    # Top-k and top-p on continuous logits (no grid): the searches must end on exact keys.
    gen = torch.Generator().manual_seed(probes)
    logits = torch.randn(4, 500, generator=gen) * 3
    noise = torch.empty(4, 500).exponential_(generator=gen)
    params = [SamplingParams(top_k=k, temperature=0.9) for k in (1, 3, 100, 499)]
    rows = Rows(logits.to(DEVICE), noise.to(DEVICE), params)
    tiling = SamplingTiling(chunk=512, block=256, probes=probes)
    got = sample_tokens(rows.logits, rows.noise, **rows.tensors(), tiling=tiling)
    assert got.tolist() == torch_path(rows).tolist()


def test_search_passes() -> None:
    assert search_passes(1, 16) == 0
    assert search_passes(2**32, 16) == 8
    assert search_passes(17, 16) == 2
    assert search_passes(16, 16) == 1
    assert search_passes(2**30, 2) == 30


# ---- kept sets against hand-computed ones -------------------------------------------------

# probs by token id: 0:0.05 1:0.5 2:0.15 3:0.3 (as in tests/test_sampler.py)
NUCLEUS_LOGITS = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64).log().float() + 3.0


NUCLEUS_CASES = [
    (SamplingParams(top_p=0.4), [1]),
    (SamplingParams(top_p=0.75), [1, 3]),  # the 0.3 crossing 0.75 is included
    (SamplingParams(top_p=0.85), [1, 2, 3]),
    (SamplingParams(top_p=0.99), [0, 1, 2, 3]),
    (SamplingParams(top_p=1e-6), [1]),
    (SamplingParams(min_p=0.35), [1, 3]),  # threshold 0.175
    (SamplingParams(min_p=0.2), [1, 2, 3]),
    (SamplingParams(min_p=1.0), [1]),
    # top-p sees the renormalised top-2: 0.625 / 0.375.
    (SamplingParams(top_k=2, top_p=0.6), [1]),
    (SamplingParams(top_k=2, top_p=0.7), [1, 3]),
    # min-p after top-p: 0.15 is 0.3 of the largest and survives 0.25; 0.05 does not.
    (SamplingParams(top_p=0.99, min_p=0.25), [1, 2, 3]),
    # probs ~ p^2: 0.685, 0.247, 0.062, 0.007 by rank.
    (SamplingParams(temperature=0.5, top_p=0.8), [1, 3]),
    (SamplingParams(temperature=0.5, top_p=0.95), [1, 2, 3]),
]


def test_kept_sets() -> None:
    cases = [params for params, _ in NUCLEUS_CASES]
    assert kept_sets(NUCLEUS_LOGITS.to(DEVICE), cases) == [kept for _, kept in NUCLEUS_CASES]


TIED_CASES = [
    (SamplingParams(top_k=1), [1, 3, 5]),  # three tokens tied at the top: all kept
    (SamplingParams(top_k=3), [1, 3, 5]),
    (SamplingParams(top_k=4), [1, 2, 3, 5]),
    (SamplingParams(top_k=5), [1, 2, 3, 4, 5]),
    (SamplingParams(top_k=6), [0, 1, 2, 3, 4, 5]),  # k = V: off
    # Each top token holds ~0.31 of the mass: the nucleus reaches 0.2 inside the tied
    # group, and the whole group stays.
    (SamplingParams(top_p=0.2), [1, 3, 5]),
    (SamplingParams(top_p=0.95), [1, 2, 3, 5]),
    (SamplingParams(min_p=1.0), [1, 3, 5]),
]


def test_ties_at_thresholds_are_kept() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 5.0, 2.0, 5.0], device=DEVICE)
    cases = [params for params, _ in TIED_CASES]
    assert kept_sets(logits, cases) == [kept for _, kept in TIED_CASES]


def test_negative_zero_ties_with_zero() -> None:
    # -0.0 == 0.0: top-k 1 keeps both zeros (they share one key).
    logits = torch.tensor([-1.0, 0.0, -3.0, -0.0, -2.0], device=DEVICE)
    assert kept_sets(logits, [SamplingParams(top_k=1)]) == [[1, 3]]


def test_minus_infinity_is_never_drawn() -> None:
    logits = torch.full((8, 300), -math.inf)
    logits[:, 7] = 0.0
    logits[:, 250] = -1.0
    noise = torch.empty(8, 300).exponential_(generator=torch.Generator().manual_seed(4))
    noise[:, 8:250] = 1e-30  # a -inf token scores 0 / E = 0 however small its draw
    params = [SamplingParams(top_k=k) for k in (0, 1, 2, 5, 299, 300)]
    params += [SamplingParams(top_p=0.9), SamplingParams(min_p=0.5)]
    rows = Rows(logits.to(DEVICE), noise.to(DEVICE), params)
    got = sample_tokens(rows.logits, rows.noise, **rows.tensors(), tiling=SMALL)
    assert set(got.tolist()) <= {7, 250}
    assert got.tolist() == torch_path(rows).tolist()


# ---- greedy rows, poisoned noise, batch invariance ---------------------------------------


def test_greedy_rows_take_the_first_largest_logit() -> None:
    logits = torch.randn(3, 700, generator=torch.Generator().manual_seed(5))
    logits[0, [300, 650]] = 9.0  # tie across chunks (chunk 256): the first wins
    logits[1, [10, 11]] = 9.0  # tie inside one step
    logits[2, :] = -math.inf  # torch's argmax of an all -inf row is 0
    noise = torch.full((3, 700), math.nan)  # greedy rows never read their noise
    temperature = torch.zeros(3)
    got = sample_tokens(logits.to(DEVICE), noise.to(DEVICE), temperature.to(DEVICE), tiling=SMALL)
    assert got.tolist() == [300, 10, 0]


def test_race_ties_take_the_first_index() -> None:
    # Equal logits and equal draws tie exactly in the race: the first index wins, whether
    # the tied tokens sit in different chunks (of 256) or in different steps (of 128) of
    # one chunk; the other tokens are masked by top-k 1.
    tied = [40, 41, 200, 300, 520]
    logits = torch.zeros(4, 600)
    logits[:, tied] = 3.0
    noise = torch.full((4, 600), 1e-30)
    noise[:, tied] = torch.tensor(
        [
            [2.0, 2.0, 1.0, 0.5, 0.5],  # 300 and 520: chunks 1 and 2
            [0.5, 1.0, 1.0, 1.0, 0.5],  # 40 and 520: chunks 0 and 2
            [0.5, 1.0, 0.5, 1.0, 1.0],  # 40 and 200: steps 0 and 1 of chunk 0
            [0.5, 0.5, 1.0, 1.0, 1.0],  # 40 and 41: one step
        ]
    )
    rows = Rows(logits.to(DEVICE), noise.to(DEVICE), [SamplingParams(top_k=1)] * 4)
    got = sample_tokens(rows.logits, rows.noise, **rows.tensors(), tiling=SMALL)
    assert got.tolist() == [300, 40, 40, 40] == torch_path(rows).tolist()


def test_noise_is_read_only_where_kept() -> None:
    rows = random_rows(6, batch=8, vocab=500, device=DEVICE)
    clean = sample_tokens(rows.logits, rows.noise, **rows.tensors(), tiling=SMALL)
    kept = torch.zeros_like(rows.logits, dtype=torch.bool)
    for i, p in enumerate(rows.params):
        if not p.is_greedy:
            kept[i] = sampling_probs(rows.logits[i : i + 1], [p])[0] > 0
    poisoned = rows.noise.masked_fill(~kept, math.nan)
    got = sample_tokens(rows.logits, poisoned, **rows.tensors(), tiling=SMALL)
    assert got.tolist() == clean.tolist()


def test_batch_invariance() -> None:
    rows = random_rows(7, batch=5, vocab=400, device=DEVICE)
    together = sample_tokens(rows.logits, rows.noise, **rows.tensors(), tiling=SMALL).tolist()
    order = [3, 0, 4, 1]
    index = torch.tensor(order, device=DEVICE)
    shuffled = Rows(rows.logits[index], rows.noise[index], [rows.params[i] for i in order])
    apart = sample_tokens(shuffled.logits, shuffled.noise, **shuffled.tensors(), tiling=SMALL)
    assert apart.tolist() == [together[i] for i in order]
    alone = Rows(rows.logits[2:3], rows.noise[2:3], rows.params[2:3])
    assert sample_tokens(alone.logits, alone.noise, **alone.tensors(), tiling=SMALL).tolist() == [
        together[2]
    ]


def test_strided_logits_and_empty_batch() -> None:
    rows = random_rows(8, batch=4, vocab=300, device=DEVICE)
    wide = torch.full((4, 400), math.nan, device=DEVICE)
    wide[:, :300] = rows.logits
    got = sample_tokens(wide[:, :300], rows.noise, **rows.tensors(), tiling=SMALL)
    assert got.tolist() == torch_path(rows).tolist()
    empty = torch.empty(0, 300, device=DEVICE)
    assert sample_tokens(empty, empty, torch.empty(0, device=DEVICE)).shape == (0,)


def test_rejects_bad_arguments() -> None:
    logits = torch.zeros(2, 10, device=DEVICE)
    temperature = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(logits.half(), logits, temperature)
    with pytest.raises(ValueError, match="noise"):
        sample_tokens(logits, logits[:, :5], temperature)
    with pytest.raises(ValueError, match="top_k"):
        sample_tokens(logits, logits, temperature, top_k=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(logits, logits, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="probes"):
        SamplingTiling(probes=3)
    with pytest.raises(ValueError, match="block"):
        SamplingTiling(chunk=256, block=512)


# ---- GPU: the real vocabulary -------------------------------------------------------------


def lm_like_logits(gen: torch.Generator, batch: int, vocab: int) -> torch.Tensor:
    """[B, V] on a 1/16 grid: a broad body plus a few hundred strong candidates per row, so
    the nucleus ranges from a handful of tokens to tens of thousands; some -inf."""
    body = torch.randn(batch, vocab, generator=gen) * 1.5
    spikes = torch.rand(batch, vocab, generator=gen) < 0.002
    body = body + spikes * (6 + 4 * torch.rand(batch, vocab, generator=gen))
    logits = torch.round(body * 16) / 16
    holes = torch.rand(batch, vocab, generator=gen) < 0.01
    return logits.masked_fill(holes, -math.inf)


@needs_gpu
@pytest.mark.parametrize("batch", [1, 7, 64, 256])
def test_gpu_real_vocab_matches_torch_path(batch: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    rng = random.Random(batch)
    logits = lm_like_logits(gen, batch, GPT_OSS_VOCAB)
    params = [random_params(row, rng) for row in logits]
    noise = torch.empty(batch, GPT_OSS_VOCAB).exponential_(generator=gen)
    rows = Rows(logits.cuda(), noise.cuda(), params)
    expected = torch_path(rows).tolist()
    assert sample_tokens(rows.logits, rows.noise, **rows.tensors()).tolist() == expected
    # And through the sampler's entry, which leaves unused steps out.
    random_rows_ = [i for i, p in enumerate(params) if not p.is_greedy]
    index = torch.tensor(random_rows_, dtype=torch.int64, device="cuda")
    got = kernel_sample(rows.logits[index], rows.noise[index], [params[i] for i in random_rows_])
    assert got.tolist() == [expected[i] for i in random_rows_]


@needs_gpu
def test_gpu_batch_invariance_real_vocab() -> None:
    gen = torch.Generator().manual_seed(11)
    rng = random.Random(11)
    logits = lm_like_logits(gen, 32, GPT_OSS_VOCAB)
    params = [random_params(row, rng) for row in logits]
    noise = torch.empty(32, GPT_OSS_VOCAB).exponential_(generator=gen)
    rows = Rows(logits.cuda(), noise.cuda(), params)
    together = sample_tokens(rows.logits, rows.noise, **rows.tensors()).tolist()
    for i in (0, 13, 31):
        alone = Rows(rows.logits[i : i + 1], rows.noise[i : i + 1], params[i : i + 1])
        assert sample_tokens(alone.logits, alone.noise, **alone.tensors()).tolist() == [together[i]]


@needs_gpu
def test_gpu_ties_and_poisoned_noise_real_vocab() -> None:
    # Eight tokens tied at the top spread over the row, the rest far below: top-k 1, top-p
    # tiny and min-p 1 all keep exactly the eight; noise elsewhere is NaN and never read.
    logits = torch.full((3, GPT_OSS_VOCAB), -20.0, device="cuda")
    tied = torch.tensor([5, 8191, 8192, 50_000, 100_001, 150_000, 200_000, 201_087])
    logits[:, tied] = 4.0
    noise = torch.full_like(logits, math.nan)
    noise[:, tied] = torch.tensor([3.0, 2.0, 5.0, 0.5, 4.0, 0.25, 9.0, 0.25], device="cuda")
    params = [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)]
    rows = Rows(logits, noise, params)
    # Smallest draw wins; 0.25 twice: the first index.
    assert sample_tokens(logits, noise, **rows.tensors()).tolist() == [150_000] * 3
