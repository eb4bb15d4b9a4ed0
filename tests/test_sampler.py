"""Sampler: each processing step against hand-computed expectations, batch invariance of
seeded requests, logprobs against an independent log-softmax, and the sampled distribution
against the target with a chi-square bound (fixed seeds, so it cannot flake)."""

import math

import pytest
import torch

from tandem.workers.engine.sampler import (
    Sampler,
    apply_penalties,
    mask_min_p,
    mask_top_k,
    mask_top_p,
    seeded_generator,
)
from tandem.workers.engine.sampling_params import SamplingParams

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
    ),
]


def _logits_of(probs: list[float], shift: float = 3.0) -> torch.Tensor:
    """[V] logits whose softmax is `probs` (shifted: softmax must not care)."""
    return torch.tensor(probs, dtype=torch.float64).log().float() + shift


def _kept(masked: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in masked]


def _sample_rows(
    logits: torch.Tensor, params: SamplingParams, seed: int, histories=None
) -> torch.Tensor:
    """Every row with the same params, drawn from one shared seeded generator."""
    batch = logits.shape[0]
    sampler = Sampler(torch.Generator().manual_seed(seed))
    out = sampler.sample(
        logits, [params] * batch, [None] * batch, histories or [((1,), ())] * batch
    )
    return out.token_ids


# ---- masks, against hand-computed keep sets ----------------------------------------------

# probs by token id: 0:0.05 1:0.5 2:0.15 3:0.3 (shuffled so the sort must map back)
NUCLEUS_PROBS = [0.05, 0.5, 0.15, 0.3]


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.4, [1]),  # 0.5 alone reaches 0.4
        (0.75, [1, 3]),  # 0.5 < 0.75, the 0.3 crossing it is included
        (0.85, [1, 2, 3]),  # 0.8 < 0.85, add 0.15
        (0.99, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_mask_top_p(top_p: float, kept: list[int]) -> None:
    logits = _logits_of(NUCLEUS_PROBS).unsqueeze(0)
    assert _kept(mask_top_p(logits, [top_p])) == [kept]


def test_mask_top_p_stops_when_mass_reaches_p_exactly() -> None:
    # top_p equal (in fp32) to the mass of the two most likely tokens: those two reach it,
    # so the third is out.
    logits = _logits_of([0.2, 0.5, 0.3]).unsqueeze(0)
    probs = logits.softmax(dim=-1)[0]
    top_p = (probs[1] + probs[2]).item()  # one fp32 rounding, as in the cumulative sum
    assert _kept(mask_top_p(logits, [top_p])) == [[1, 2]]
    above = torch.nextafter(torch.tensor(top_p), torch.tensor(1.0)).item()  # next fp32 up
    assert _kept(mask_top_p(logits, [above])) == [[0, 1, 2]]


def test_mask_top_p_rows_independent() -> None:
    logits = torch.stack([_logits_of(NUCLEUS_PROBS), _logits_of(NUCLEUS_PROBS[::-1])])
    assert _kept(mask_top_p(logits, [0.75, 0.4])) == [[1, 3], [2]]


@pytest.mark.parametrize(
    ("k", "kept"),
    [
        (1, [1, 3]),  # two tokens tied at the top: both kept
        (2, [1, 3]),
        (3, [1, 2, 3]),
        (5, [0, 1, 2, 3, 4]),
    ],
)
def test_mask_top_k(k: int, kept: list[int]) -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 5.0, 2.0]])
    assert _kept(mask_top_k(logits, [k])) == [kept]


def test_mask_top_k_rows_with_different_k() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [9.0, 8.0, 7.0, 6.0, 5.0]])
    assert _kept(mask_top_k(logits, [1, 4])) == [[1], [0, 1, 2, 3]]


@pytest.mark.parametrize(
    ("min_p", "kept"),
    [
        (0.35, [1, 3]),  # threshold 0.175
        (0.2, [1, 2, 3]),  # threshold 0.1
        (0.05, [0, 1, 2, 3]),  # threshold 0.025
        (1.0, [1]),
    ],
)
def test_mask_min_p(min_p: float, kept: list[int]) -> None:
    logits = _logits_of(NUCLEUS_PROBS).unsqueeze(0)
    assert _kept(mask_min_p(logits, [min_p])) == [kept]


# ---- penalties, exactly as the formulas say -------------------------------------------------


def test_apply_penalties_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [2.0, -1.0, 0.5, 3.0, -2.0]])
    histories = [((0,), (1, 3, 3)), ((), (4,))]
    out = apply_penalties(logits, histories, [2.0, 0.5], [0.5, 0.0], [0.25, -0.5])
    expected = torch.tensor(
        [
            # 0: prompt, 2/2; 1: -1*2, once in output: -0.5-0.25; 2: unseen;
            # 3: 3/2, twice: -2*0.5-0.25; 4: unseen
            [1.0, -2.75, 0.5, 0.25, -2.0],
            # 4: -2*0.5, once, presence -0.5 adds 0.5; others unseen
            [2.0, -1.0, 0.5, 3.0, -0.5],
        ]
    )
    assert torch.equal(out, expected)


def test_penalties_steer_greedy_but_not_logprobs() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    greedy = SamplingParams(temperature=0.0, presence_penalty=0.5, logprobs=1)
    out = Sampler().sample(logits, [greedy], [None], [((2,), (0,))])
    assert out.token_ids.tolist() == [1]
    raw = torch.log_softmax(logits.double(), dim=-1)[0]
    assert out.logprobs[0].logprob == pytest.approx(raw[1].item(), abs=1e-6)
    assert out.logprobs[0].top[0][0] == 0  # the raw distribution still ranks token 0 first


# ---- min_tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generated", "eos", "token"),
    [
        (0, [[9]], 5),  # eos and stop id 3 masked
        (1, [[9]], 5),
        (2, [[9]], 9),  # min_tokens reached
        (0, None, 9),  # eos not given: only the stop id is masked
    ],
)
def test_min_tokens_masks_stop_and_eos(generated: int, eos, token: int) -> None:
    logits = torch.zeros(1, 10)
    logits[0, 9], logits[0, 3], logits[0, 5] = 3.0, 2.0, 1.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(3,))
    history = ((1,), (7,) * generated)
    out = Sampler().sample(logits, [params], [None], [history], eos_token_ids=eos)
    assert out.token_ids.tolist() == [token]


# ---- greedy / top-k 1 / empirical support ---------------------------------------------------


def test_greedy_is_argmax_and_input_untouched() -> None:
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    params = [SamplingParams(temperature=0.0, top_p=0.3, top_k=2)] * 6
    out = Sampler().sample(logits, params, [None] * 6, [((1,), ())] * 6)
    assert out.token_ids.dtype == torch.int64
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()
    assert torch.equal(logits, before)


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(8)]
    generators = [seeded_generator(i, "cpu") for i in range(8)]
    out = Sampler().sample(logits, params, generators, [((1,), ())] * 8)
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()


def test_top_p_support_empirical() -> None:
    logits = _logits_of(NUCLEUS_PROBS).expand(400, -1).contiguous()
    tokens = _sample_rows(logits, SamplingParams(top_p=0.75), seed=3)
    assert set(tokens.tolist()) == {1, 3}


def test_min_p_support_empirical() -> None:
    logits = _logits_of(NUCLEUS_PROBS).expand(400, -1).contiguous()
    tokens = _sample_rows(logits, SamplingParams(min_p=0.2), seed=4)
    assert set(tokens.tolist()) == {1, 2, 3}


# ---- distribution ---------------------------------------------------------------------------

TARGET = [0.4, 0.25, 0.15, 0.1, 0.07, 0.03]


def _renormalised(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(), TARGET),
        (SamplingParams(temperature=0.5), _renormalised([p**2 for p in TARGET])),
        (SamplingParams(temperature=2.0), _renormalised([p**0.5 for p in TARGET])),
        (SamplingParams(top_k=3), _renormalised(TARGET[:3] + [0.0] * 3)),
        (SamplingParams(top_p=0.7), _renormalised(TARGET[:3] + [0.0] * 3)),
        (SamplingParams(min_p=0.5), _renormalised(TARGET[:2] + [0.0] * 4)),
    ],
    ids=["t1", "t0.5", "t2", "top_k3", "top_p0.7", "min_p0.5"],
)
def test_sampled_distribution_matches(params: SamplingParams, expected: list[float]) -> None:
    draws = 6000
    logits = _logits_of(TARGET).expand(draws, -1).contiguous()
    counts = torch.bincount(_sample_rows(logits, params, seed=5), minlength=len(TARGET))
    support = [i for i, p in enumerate(expected) if p > 0]
    assert all(counts[i] == 0 for i in range(len(TARGET)) if i not in support)
    chi2 = sum(
        (counts[i].item() - draws * expected[i]) ** 2 / (draws * expected[i]) for i in support
    )
    # df <= 5; P(chi2 > 30) < 2e-5 for a correct sampler, and the seed is fixed anyway.
    # A sampler off by 10% on the 0.25 token gives chi2 ~ 24 on that cell alone.
    assert chi2 < 30, (counts.tolist(), chi2)


# ---- logprobs -------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * 3
    params = [
        SamplingParams(temperature=0.7, top_k=10, presence_penalty=0.5, logprobs=5, seed=1),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(),
    ]
    histories = [((1, 2), (3, 3)), ((4,), ()), ((5,), ())]
    out = Sampler().sample(logits, params, [seeded_generator(1, "cpu"), None, None], histories)
    ref = logits.double() - logits.double().logsumexp(dim=-1, keepdim=True)  # [3, 50]
    tokens = out.token_ids.tolist()
    row0 = out.logprobs[0]
    assert row0.logprob == pytest.approx(ref[0, tokens[0]].item(), abs=1e-5)
    expected_ids = ref[0].argsort(descending=True)[:5].tolist()
    assert [token for token, _ in row0.top] == expected_ids
    for token, value in row0.top:
        assert value == pytest.approx(ref[0, token].item(), abs=1e-5)
    row1 = out.logprobs[1]
    assert row1.top == ()
    assert row1.logprob == pytest.approx(ref[1].max().item(), abs=1e-5)
    assert out.logprobs[2] is None


# ---- seeded reproducibility and batch invariance -------------------------------------------

VOCAB = 257
STEPS = 6
TARGET_REQUEST = SamplingParams(
    temperature=0.8,
    top_k=40,
    top_p=0.9,
    min_p=0.01,
    repetition_penalty=1.3,
    frequency_penalty=0.4,
    seed=1234,
)
OTHERS = {
    "seeded": SamplingParams(temperature=1.0, seed=99),
    "unseeded": SamplingParams(temperature=1.2, top_p=0.5),
    "greedy": SamplingParams(temperature=0.0, presence_penalty=1.0),
    "top_k": SamplingParams(top_k=3, min_tokens=4, seed=7),
}


def _step_logits(name: str, step: int) -> torch.Tensor:
    """[V] logits of request `name` at `step`: fixed, whatever the batch."""
    seed = 1000 * (sorted(["target", *OTHERS]).index(name) + 1) + step
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def _generate(names: list[str], device: str, sampler_seed: int = 0) -> dict[str, list[int]]:
    params = {"target": TARGET_REQUEST, **OTHERS}
    generators = {
        n: seeded_generator(params[n].seed, device) if params[n].seed is not None else None
        for n in names
    }
    shared = torch.Generator(device=device).manual_seed(sampler_seed)
    sampler = Sampler(shared)
    outputs: dict[str, list[int]] = {n: [] for n in names}
    for step in range(STEPS):
        logits = torch.stack([_step_logits(n, step) for n in names]).to(device)
        out = sampler.sample(
            logits,
            [params[n] for n in names],
            [generators[n] for n in names],
            [((3, 4, 5), tuple(outputs[n])) for n in names],
            eos_token_ids=[[0]] * len(names),
        )
        for n, token in zip(names, out.token_ids.tolist(), strict=True):
            outputs[n].append(token)
    return outputs


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_is_batch_invariant(device: str) -> None:
    alone = _generate(["target"], device)["target"]
    assert alone == _generate(["target"], device, sampler_seed=1)["target"]
    for names in (
        ["seeded", "target", "unseeded", "greedy", "top_k"],
        ["top_k", "greedy", "unseeded", "seeded", "target"],
        ["greedy", "target"],
    ):
        assert _generate(names, device)["target"] == alone, names
    both = _generate(["seeded", "top_k"], device)
    mixed = _generate(["top_k", "target", "seeded"], device)
    assert mixed["seeded"] == both["seeded"] and mixed["top_k"] == both["top_k"]


def test_different_seeds_differ() -> None:
    logits = torch.zeros(2, 1000)  # uniform: two seeds agreeing 8 times in a row is ~1e-24
    params = [SamplingParams(seed=1), SamplingParams(seed=2)]
    generators = [seeded_generator(1, "cpu"), seeded_generator(2, "cpu")]
    sampler = Sampler()
    steps = [
        sampler.sample(logits, params, generators, [((1,), ())] * 2).token_ids.tolist()
        for _ in range(8)
    ]
    first, second = [s[0] for s in steps], [s[1] for s in steps]
    assert first != second
    assert len(set(first)) > 1  # the generator advances between steps


def test_unseeded_rows_follow_the_shared_generator() -> None:
    logits = torch.zeros(4, 1000)
    params = [SamplingParams()] * 4
    draw = [
        Sampler(torch.Generator().manual_seed(s))
        .sample(logits, params, [None] * 4, [((1,), ())] * 4)
        .token_ids.tolist()
        for s in (8, 8, 9)
    ]
    assert draw[0] == draw[1] and draw[0] != draw[2]


def test_rejects_mismatched_batch() -> None:
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="generators"):
        Sampler().sample(logits, [SamplingParams()] * 2, [None], [((1,), ())] * 2)
    with pytest.raises(ValueError, match="float32"):
        Sampler().sample(logits.half(), [SamplingParams()] * 2, [None] * 2, [((1,), ())] * 2)


def test_exponential_race_never_picks_a_masked_token() -> None:
    # Half the vocabulary masked to probability 0; many draws must all land on the other half.
    logits = torch.zeros(500, 64)
    logits[:, ::2] = -math.inf
    tokens = _sample_rows(logits, SamplingParams(), seed=6)
    assert all(t % 2 == 1 for t in tokens.tolist())


# ---- kernel path (kernels/sampling.py) against the torch path ------------------------------


def test_uses_kernel_on_cuda_only_by_default() -> None:
    assert not Sampler().uses_kernel(torch.device("cpu"))
    assert Sampler().uses_kernel(torch.device("cuda"))
    assert not Sampler(use_kernel=False).uses_kernel(torch.device("cuda"))
    assert Sampler(use_kernel=True).uses_kernel(torch.device("cpu"))


# The kernel runs on CUDA tensors there, and on CPU tensors only through the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("device", [KERNEL_DEVICE])
def test_kernel_path_equals_torch_path(device: str) -> None:
    # Every step at once (penalties, min_tokens, greedy, seeds, the shared generator), two
    # steps so the generators advance; on CPU the kernel runs in the Triton interpreter.
    params = [
        TARGET_REQUEST,
        *OTHERS.values(),
        SamplingParams(temperature=0.6, top_k=5, top_p=0.8, seed=3),
        SamplingParams(temperature=1.3, min_p=0.05),
    ]
    names = ["target", *OTHERS, "target", "seeded"]  # logits of the extra rows reuse names
    histories = [((3, 4, 5), (7, 7)), ((3,), ()), ((3,), (1,)), ((3,), ()), ((2,), ())] * 2
    tokens = {}
    for use_kernel in (False, True):
        sampler = Sampler(torch.Generator(device=device).manual_seed(0), use_kernel=use_kernel)
        generators = [
            seeded_generator(p.seed, device) if p.seed is not None else None for p in params
        ]
        steps = []
        for step in range(2):
            logits = torch.stack([_step_logits(n, step) for n in names]).to(device)
            out = sampler.sample(
                logits, params, generators, histories[: len(params)], [[0]] * len(params)
            )
            steps.append(out.token_ids.tolist())
        tokens[use_kernel] = steps
    assert tokens[True] == tokens[False]
