"""Asynchronous scheduling (LLMEngine.step with a step in flight) against the synchronous
engine on the tiny checkpoint (CPU, fp32): the same tokens, text, finish reasons and usage
for every request, through stops, min_tokens, preemption, aborts and sampled rows that
force the synchronous path in between."""

from __future__ import annotations

import asyncio
import random

import pytest

from tandem.workers.engine.async_engine import AsyncLLMEngine
from tandem.workers.engine.llm_engine import PENDING_TOKEN, EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams

BLOCK = 8


def make_engine(model_dir, async_scheduling: bool, **overrides) -> LLMEngine:
    config = dict(
        device="cpu",
        dtype="float32",
        block_size=BLOCK,
        kv_cache_tokens=4096,
        max_num_seqs=16,
        max_num_batched_tokens=96,
        async_scheduling=async_scheduling,
    )
    config.update(overrides)
    return LLMEngine.from_model_dir(model_dir, EngineConfig(**config))


def prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.choice((1, 6, 17, 40)))] for _ in range(n)]


def run(engine: LLMEngine, batch, params) -> list[tuple]:
    done = engine.generate(batch, params)
    return [(c.token_ids, c.text, c.finish_reason, c.usage) for c in done]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    return make_engine(tiny_model_dir, False), make_engine(tiny_model_dir, True)


def test_greedy_async_equals_sync_token_for_token(engines):
    sync, pipelined = engines
    batch = prompts(sync.config.vocab_size, 12, seed=1)
    free = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reference = sync.generate(batch, free)
    # Both engines now hold the same prefix cache, and the cached blocks the pipelined one
    # indexed must be the real tokens' (a placeholder hashed would change later hits).
    assert run(pipelined, batch, free) == [
        (c.token_ids, c.text, c.finish_reason, c.usage) for c in reference]
    # Stops taken from the free-running output, so requests end mid-stream at known points.
    params = []
    for i, c in enumerate(reference):
        if i % 4 == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=16,
                                         stop_token_ids=(c.token_ids[5],)))
        elif i % 4 == 1 and len(c.text) > 6:
            params.append(SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                         stop=(c.text[3:5],)))
        elif i % 4 == 2:
            params.append(SamplingParams(temperature=0.0, max_tokens=3 + i, ignore_eos=True,
                                         min_tokens=2, stop_token_ids=(c.token_ids[0],)))
        else:
            params.append(free)
    before = pipelined.metrics()["pipelined_steps"]
    assert run(pipelined, batch, params) == run(sync, batch, params)
    assert pipelined.metrics()["pipelined_steps"] > before  # the asynchronous path ran
    assert sync.metrics()["pipelined_steps"] == 0
    assert max(pipelined.kv.usage) == 0.0
    pipelined.kv.check_integrity()


def test_mixed_sampling_falls_back_and_matches(engines):
    """Seeded random rows and logprobs need the host: steps with them run synchronously,
    between pipelined ones, and every request still matches the synchronous engine."""
    sync, pipelined = engines
    batch = prompts(sync.config.vocab_size, 6, seed=2)
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)] * 4 + [
        SamplingParams(temperature=0.8, seed=7, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2),
    ]
    got = pipelined.generate(batch, params)
    want = sync.generate(batch, params)
    for g, w in zip(got, want, strict=True):
        assert (g.token_ids, g.text, g.finish_reason, g.usage) == (
            w.token_ids, w.text, w.finish_reason, w.usage)
        assert [lp.token_id for lp in g.logprobs] == [lp.token_id for lp in w.logprobs]


def test_preemption_under_async_scheduling(tiny_model_dir, engines):
    sync, _ = engines
    batch = prompts(sync.config.vocab_size, 8, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [c.token_ids for c in sync.generate(batch, params)]
    tight = make_engine(tiny_model_dir, True, kv_cache_tokens=12 * BLOCK,
                        enable_prefix_caching=False)
    assert [c.token_ids for c in tight.generate(batch, params)] == expected
    assert tight.metrics()["preemptions"] > 0
    assert tight.metrics()["pipelined_steps"] > 0
    tight.kv.check_integrity()


def test_abort_with_a_step_in_flight(tiny_model_dir):
    engine = make_engine(tiny_model_dir, True)
    batch = prompts(engine.config.vocab_size, 4, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in batch]
    delivered = {i: 0 for i in ids}
    for _ in range(200):
        for out in engine.step():
            delivered[out.request_id] += len(out.token_ids)
        if engine.step_in_flight and min(delivered.values()) >= 2:
            break
    assert engine.step_in_flight
    for request_id in ids:
        out = engine.abort(request_id)
        assert out.finish_reason == "abort"
        # The token still on the device is dropped, not counted.
        assert out.usage.completion_tokens == delivered[request_id]
        assert PENDING_TOKEN not in engine.scheduler.get(request_id).output_token_ids \
            if engine.scheduler.get(request_id) else True
    assert engine.step() == []  # the step in flight is drained, nothing is delivered
    assert not engine.has_unfinished() and not engine.step_in_flight
    assert max(engine.kv.usage) == 0.0
    engine.kv.check_integrity()


def test_streamed_deltas_under_async_scheduling(engines):
    _, pipelined = engines
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    deltas = list(pipelined.stream([1, 2, 3, 4], params))
    ids = [t for d in deltas for t in d.token_ids]
    assert PENDING_TOKEN not in ids
    assert "".join(d.text_delta for d in deltas) == pipelined.tokenizer.decode(ids)
    assert deltas[-1].finished and deltas[-1].usage.completion_tokens == 20


def test_async_llm_engine_streams_under_async_scheduling(tiny_model_dir, engines):
    """The asyncio engine's loop over a pipelining engine: concurrent streams equal the
    synchronous engine's output, and a cancelled stream frees its KV."""
    sync, _ = engines
    batch = prompts(sync.config.vocab_size, 3, seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    expected = sync.generate(batch, params)
    engine = AsyncLLMEngine(make_engine(tiny_model_dir, True))

    async def collect(prompt):
        ids, text = [], ""
        async for out in engine.generate(prompt, params):
            ids.extend(out.token_ids)
            text += out.text_delta
        return ids, text, out.finish_reason

    async def cancelled():
        long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
        async for out in engine.generate(batch[0], long):
            if out.usage.completion_tokens >= 3:
                break

    async def main():
        results = await asyncio.gather(*(collect(p) for p in batch))
        await cancelled()
        return results

    try:
        results = asyncio.run(main())
        assert engine.call(lambda e: max(e.kv.usage)) == 0.0
        assert engine.call(lambda e: e.metrics()["pipelined_steps"]) > 0
    finally:
        engine.shutdown()
    for (ids, text, reason), want in zip(results, expected, strict=True):
        assert (ids, text, reason) == (want.token_ids, want.text, "length")
