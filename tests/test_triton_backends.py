"""The Triton backends in the model and the engine, against the torch reference backends.

On CPU the kernels run through Triton's interpreter (tests/conftest.py), on a GPU compiled;
both in float32 with exact fp32 dots, so the two paths must agree to fp32 rounding:
identical greedy tokens and logits within a normalised 1e-4. The torch path is itself
checked against transformers (tests/test_engine.py, tests/test_model_parity.py).
"""

from __future__ import annotations

import random

import pytest
import torch

from tandem.kernels.moe import MoEGemvTiling, moe_mxfp4, moe_mxfp4_reference
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.runner import DecodeGraphs, ModelRunner
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.engine.scheduler import ScheduledRequest, SchedulerOutput
from tandem.workers.model.attention import TorchPagedAttention
from tandem.workers.model.layers import TorchNorm, TorchRotary
from tandem.workers.model.moe import TorchMoE
from tandem.workers.model.triton_backends import (
    TritonMoE,
    TritonPagedAttention,
    default_kernels,
    make_backends,
)
from tandem.workers.model.weights import load_model
from tests.support.moe_weights import errors as kernel_errors
from tests.support.moe_weights import make_weights, poisoned_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 8
LOGIT_TOLERANCE = 1e-4  # normalised max error; fp32 paths differ only in summation order
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=4)


def make_engine(model_dir, kernels: str) -> LLMEngine:
    # A 16-token step budget chunks the longest prompt and mixes its chunks with decodes.
    config = EngineConfig(
        device=DEVICE,
        dtype="float32",
        block_size=BLOCK,
        kv_cache_tokens=512,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        kernels=kernels,
    )
    return LLMEngine.from_model_dir(model_dir, config)


def prompts(vocab: int) -> list[list[int]]:
    """Short, block-unaligned, and one longer than the sliding window (16)."""
    rng = random.Random(3)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (3, 11, 21)]


def normalised_max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_engine_greedy_tokens_and_logprobs_match_torch(tiny_model_dir):
    reference = make_engine(tiny_model_dir, "torch")
    triton_engine = make_engine(tiny_model_dir, "triton")
    assert isinstance(triton_engine.runner.model.attention, TritonPagedAttention)
    assert isinstance(triton_engine.runner.model.moe, TritonMoE)
    batch = prompts(reference.config.vocab_size)
    expected = reference.generate(batch, GREEDY)
    actual = triton_engine.generate(batch, GREEDY)
    for want, got in zip(expected, actual, strict=True):
        assert got.token_ids == want.token_ids
        assert len(got.logprobs) == len(want.logprobs) == GREEDY.max_tokens
        for got_lp, want_lp in zip(got.logprobs, want.logprobs, strict=True):
            assert [i for i, _ in got_lp.top] == [i for i, _ in want_lp.top]
            got_values = torch.tensor([got_lp.logprob] + [v for _, v in got_lp.top])
            want_values = torch.tensor([want_lp.logprob] + [v for _, v in want_lp.top])
            torch.testing.assert_close(got_values, want_values, rtol=1e-4, atol=1e-4)


def test_prompt_logits_match_torch(tiny_model_dir):
    models = {}
    for kernels in ("torch", "triton"):
        attention, moe = make_backends(kernels, DEVICE)
        models[kernels], config = load_model(
            tiny_model_dir, dtype=torch.float32, device=DEVICE, attention=attention, moe=moe
        )
    torch_model, triton_model = models["torch"], models["triton"]
    rng = random.Random(5)
    prompt = [rng.randrange(config.vocab_size) for _ in range(37)]  # > 2 windows, 5 blocks
    expected = torch_model.forward_full(prompt, block_size=BLOCK)  # [37, V]
    actual = triton_model.forward_full(prompt, block_size=BLOCK)
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    assert normalised_max_error(actual, expected) < LOGIT_TOLERANCE
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_backend_choice():
    assert default_kernels("cpu") == "torch"
    assert default_kernels("cuda") == "triton"
    attention, moe = make_backends(None, "cpu")
    assert isinstance(attention, TorchPagedAttention) and isinstance(moe, TorchMoE)
    attention, moe = make_backends("triton", DEVICE)  # on CPU the tests run the interpreter
    assert isinstance(attention, TritonPagedAttention) and isinstance(moe, TritonMoE)
    with pytest.raises(ValueError, match="kernels"):
        make_backends("cuda", "cpu")
    with pytest.raises(ValueError, match="EngineConfig.kernels"):
        EngineConfig(kernels="fast")


def test_model_routes_norms_and_rotary_through_the_kernels(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, dtype=torch.float32, device=DEVICE,
                          attention=TritonPagedAttention(), moe=TritonMoE())
    norms = [model.norm] + [n for layer in model.layers
                            for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert all(n.backend is model.attention for n in norms)
    assert all(layer.self_attn.rotary is model.attention for layer in model.layers)
    model.set_backends(TorchPagedAttention(), TorchMoE())
    assert all(type(n.backend) is TorchNorm for n in norms)
    assert all(type(layer.self_attn.rotary) is TorchRotary for layer in model.layers)
    assert all(type(layer.mlp.backend) is TorchMoE for layer in model.layers)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        make_backends("triton", "cpu")
    attention, _ = make_backends("torch", "cpu")
    assert isinstance(attention, TorchPagedAttention)


# ---------------------------------------------------------------------------------------
# Decode steps over static, padded buffers (what the CUDA graphs replay) against eager.
# ---------------------------------------------------------------------------------------


class StepPlanner:
    """Scheduler stand-in: sequence b owns blocks [b * 8, b * 8 + 8) of every group; the
    sliding group's blocks wholly before the window are released (-1), as the engine does."""

    BLOCKS_PER_SEQ = 8

    def __init__(self, config, prompts: list[list[int]]) -> None:
        self.windows = [spec.sliding_window for spec in config.kv_groups]
        self.tokens = [list(p) for p in prompts]
        self.cached = [0] * len(prompts)

    def step(self, new_tokens: list[int] | None = None) -> SchedulerOutput:
        """The prompts' prefill when new_tokens is None, else one decode token each."""
        if new_tokens is not None:
            for tokens, token in zip(self.tokens, new_tokens, strict=True):
                tokens.append(token)
        scheduled = []
        for b, tokens in enumerate(self.tokens):
            start, end = self.cached[b], len(tokens)
            tables = []
            for window in self.windows:
                ids = [b * self.BLOCKS_PER_SEQ + i for i in range(-(-end // BLOCK))]
                if window is not None:
                    first_needed = max(0, start - window + 1) // BLOCK
                    ids = [-1] * first_needed + ids[first_needed:]
                tables.append(ids)
            scheduled.append(
                ScheduledRequest(
                    request_id=f"r{b}",
                    token_ids=tokens[start:end],
                    start_position=start,
                    num_new_tokens=end - start,
                    block_tables=tables,
                    slot_ids=[[] for _ in tables],  # unused by the runner
                    needs_sample=True,
                    is_new=start == 0,
                    num_cached_tokens=0,
                )
            )
            self.cached[b] = end
        return SchedulerOutput(scheduled=scheduled)


def decode_prompts(vocab: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def triton_runner(tiny_model_dir, device: str, graph_sizes: tuple[int, ...]) -> ModelRunner:
    attention, moe = make_backends("triton", device)
    model, _ = load_model(
        tiny_model_dir, dtype=torch.float32, device=device, attention=attention, moe=moe
    )
    num_seqs = 8
    blocks = [num_seqs * StepPlanner.BLOCKS_PER_SEQ] * len(model.config.kv_groups)
    return ModelRunner(
        model, blocks, BLOCK, torch.device(device), torch.float32, cuda_graph_sizes=graph_sizes
    )


def test_padded_static_decode_step_matches_eager(tiny_model_dir):
    """Three sequences padded to four rows, one with a released sliding block (-1)."""
    runner = triton_runner(tiny_model_dir, DEVICE, graph_sizes=())
    planner = StepPlanner(
        runner.model.config, decode_prompts(runner.model.config.vocab_size, (4, 29, 12))
    )
    prefill_logits = runner.execute(planner.step())  # [3, V]
    decode = planner.step(prefill_logits.argmax(-1).tolist())
    sliding = planner.windows.index(16)
    assert decode.scheduled[1].block_tables[sliding][:1] == [-1]  # position 29: reads 14..29
    eager = runner.execute(decode)  # writes the new k/v; the padded step rewrites the same
    graphs = DecodeGraphs(runner.model, runner.kv_caches, BLOCK, sizes=(1, 4))
    padded = graphs.run_eagerly(decode.scheduled)
    assert graphs.padded_size(3) == 4
    assert padded.shape == eager.shape
    assert normalised_max_error(padded, eager) < LOGIT_TOLERANCE
    assert torch.equal(padded.argmax(-1), eager.argmax(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_matches_eager(tiny_model_dir):
    """Batches of 1, 3 and 5 sequences (padded to 1, 4, 8), several steps each."""
    graphed = triton_runner(tiny_model_dir, "cuda", graph_sizes=(1, 2, 4, 8))
    eager = triton_runner(tiny_model_dir, "cuda", graph_sizes=())
    vocab = graphed.model.config.vocab_size
    for lengths in ((5,), (3, 20, 9), (1, 7, 16, 30, 2)):
        for runner in (graphed, eager):  # fresh blocks: zero the caches between batches
            for key, value in runner.kv_caches:
                key.zero_()
                value.zero_()
        planners = [
            StepPlanner(graphed.model.config, decode_prompts(vocab, lengths)) for _ in range(2)
        ]
        expected = eager.execute(planners[1].step())
        actual = graphed.execute(planners[0].step())  # prefill: never a graph
        for _ in range(4):
            tokens = expected.argmax(-1).tolist()
            expected = eager.execute(planners[1].step(tokens))
            actual = graphed.execute(planners[0].step(tokens))
            assert normalised_max_error(actual, expected) < LOGIT_TOLERANCE
            assert torch.equal(actual.argmax(-1), expected.argmax(-1))
    assert sorted(graphed.decode_graphs.graphs) == [1, 4, 8]
    assert eager.decode_graphs is None


@pytest.mark.parametrize(
    ("tiling", "num_tokens", "d_model", "d_ff", "dtype"),
    [
        # Several output tiles per pair and a partial last K step (96 = 64 + 32).
        (MoEGemvTiling(block_n=16, block_k=64), 3, 96, 64, torch.float32),
        (MoEGemvTiling(block_n=8, block_k=32, num_warps=2), 2, 64, 96, torch.bfloat16),
        # Beyond the default threshold: still correct, only slower on a GPU.
        (MoEGemvTiling(block_n=32, block_k=256), 20, 64, 64, torch.float32),
    ],
)
def test_moe_gemv_tilings_match_reference(tiling, num_tokens, d_model, d_ff, dtype):
    """The small-batch MoE path (what decode steps run) at tilings the default skips on
    CPU, against the fp32 reference; x rows are views into NaN-padded memory."""
    w = make_weights(5, d_model, d_ff, seed=num_tokens)
    x = poisoned_rows(num_tokens, d_model, dtype, seed=num_tokens + 1)
    out = moe_mxfp4(x, **w, top_k=2, tiling=tiling)
    assert out.shape == (num_tokens, d_model) and out.dtype == dtype
    max_err, rms_err = kernel_errors(out, moe_mxfp4_reference(x, **w, top_k=2))
    max_bound, rms_bound = (2e-5, 5e-6) if dtype == torch.float32 else (2e-2, 8e-3)
    assert max_err < max_bound and rms_err < rms_bound, (max_err, rms_err)
