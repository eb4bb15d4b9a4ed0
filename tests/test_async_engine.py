"""The asyncio engine: streaming, cancellation freeing KV, and a health check that
exercises the engine thread."""

from __future__ import annotations

import asyncio
import threading

from tandem.workers.engine.async_engine import AsyncLLMEngine
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def make(tiny_model_dir) -> AsyncLLMEngine:
    config = EngineConfig(device="cpu", block_size=8, kv_cache_tokens=2048)
    return AsyncLLMEngine(LLMEngine.from_model_dir(tiny_model_dir, config))


def test_concurrent_streams_match_sync_engine(tiny_model_dir):
    prompts = [[1, 2, 3], [9] * 20, [4, 5, 6, 7, 8, 9, 10]]
    expected = LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(device="cpu")).generate(
        prompts, GREEDY
    )
    engine = make(tiny_model_dir)

    async def collect(prompt):
        ids, text = [], ""
        async for out in engine.generate(prompt, GREEDY):
            ids.extend(out.token_ids)
            text += out.text_delta
        return ids, text, out.finish_reason

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for (ids, text, reason), want in zip(results, expected, strict=True):
        assert ids == want.token_ids and text == want.text and reason == "length"


def test_cancelled_stream_frees_kv(tiny_model_dir):
    engine = make(tiny_model_dir)
    long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)

    async def main():
        seen = 0
        async for _ in engine.generate([3] * 40, long):
            seen += 1
            if seen == 3:
                break  # leaving the loop early aborts the request
        for _ in range(100):
            if max(engine.metrics()["kv_usage"] for _ in [0]) == 0.0:
                return seen
            await asyncio.sleep(0.01)
        return -1

    try:
        assert asyncio.run(main()) == 3
        assert not engine.engine.has_unfinished()
    finally:
        engine.shutdown()


def test_health_reflects_a_stuck_engine(tiny_model_dir):
    engine = make(tiny_model_dir)
    release = threading.Event()
    real_step = engine.engine.step

    def stuck_step():
        release.wait()
        return real_step()

    async def main():
        healthy = await engine.check_health(timeout_s=2.0)
        engine.engine.step = stuck_step
        task = asyncio.ensure_future(_drain(engine.generate([1, 2], GREEDY)))
        await asyncio.sleep(0.2)
        stuck = await engine.check_health(timeout_s=0.5)
        release.set()
        await task
        return healthy, stuck

    try:
        healthy, stuck = asyncio.run(main())
    finally:
        engine.shutdown()
    assert healthy is True and stuck is False


async def _drain(stream):
    async for _ in stream:
        pass
