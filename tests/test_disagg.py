"""Disaggregated prefill/decode without Ray: a prefill and a decode worker over a real
gloo pair group, checked token for token against the in-process engine."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tandem.cluster.autoscaling import REPORTED_METRICS
from tandem.workers.disagg.roles import (
    DecodeWorker,
    DisaggConfig,
    GenerateMessage,
    PrefillWorker,
    decode_delta,
)
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams

CONFIG = EngineConfig(device="cpu", block_size=8, kv_cache_tokens=4096, max_num_batched_tokens=128)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def workers(tiny_model_dir):
    prefill = PrefillWorker.create(tiny_model_dir, CONFIG, "prefill-0", "127.0.0.1")
    decode = DecodeWorker.create(
        tiny_model_dir,
        CONFIG,
        "decode-0",
        "127.0.0.1",
        DisaggConfig(local_prefill_threshold=16, transfer_deadline_s=5.0),
    )
    yield prefill, decode
    decode.close()
    prefill.close()


def run(decode: DecodeWorker, prompt, params, prefill=None, replica="prefill-0", rid="r"):
    async def go():
        ids, served, finish = [], None, None
        message = GenerateMessage(rid, tuple(prompt), params).to_json()
        async for text in decode.generate(message, prefill, replica):
            out, info = decode_delta(text)
            ids.extend(out.token_ids)
            if out.finished:
                served, finish, usage = info, out.finish_reason, out.usage
        return ids, served, finish, usage

    return asyncio.run(go())


def test_remote_prefill_matches_in_process_engine(tiny_model_dir, workers):
    prefill, decode = workers
    reference = LLMEngine.from_model_dir(tiny_model_dir, CONFIG)
    rng = random.Random(0)
    vocab = reference.config.vocab_size
    seeded = SamplingParams(temperature=0.8, top_k=40, seed=7, max_tokens=10, ignore_eos=True)
    # Distinct prompts: a repeated one would hit the decode worker's prefix cache and,
    # its uncached part being short, rightly be prefilled there.
    for i, (n, params) in enumerate([(40, GREEDY), (57, seeded), (90, GREEDY), (33, seeded)]):
        prompt = [rng.randrange(vocab) for _ in range(n)]
        [want] = reference.generate([prompt], params)
        ids, served, finish, _ = run(decode, prompt, params, prefill.prefill, rid=f"remote-{i}")
        assert ids == want.token_ids
        assert finish == "length"
        assert served.prefill_mode == "remote", (i, served)
        assert served.prefill_replica == "prefill-0"
    assert decode.metrics()["kv_usage"] == 0.0 and prefill.metrics()["kv_usage"] == 0.0


def test_prefix_reuse_on_each_side(workers):
    prefill, decode = workers
    rng = random.Random(1)
    shared = [rng.randrange(1000) for _ in range(48)]
    first = shared + [rng.randrange(1000) for _ in range(30)]
    first_out, _, _, _ = run(decode, first, GREEDY, prefill.prefill, rid="p1")
    # A sibling prompt: the prefill worker computed all of `first`, so it reuses the 48
    # shared tokens. The decode worker received only the last sliding window of `first`,
    # so it holds no sliding-layer KV ending at token 48 and cannot serve that prefix.
    sibling = shared + [rng.randrange(1000) for _ in range(30)]
    _, served, _, usage = run(decode, sibling, GREEDY, prefill.prefill, rid="p2")
    assert served.prefill_mode == "remote" and served.prefill_cached_tokens == 48
    assert usage.cached_tokens == 0
    # The next turn of the conversation extends `first` and its answer: the decode worker
    # computed 78 + 9 tokens of it, so the 10 full blocks (80 tokens) are its to reuse,
    # and only the new turn's 30 tokens move.
    turn2 = first + first_out + [rng.randrange(1000) for _ in range(30)]
    _, served, _, usage = run(decode, turn2, GREEDY, prefill.prefill, rid="p3")
    assert usage.cached_tokens == 80
    assert served.prefill_mode == "remote"


def test_short_uncached_part_is_prefilled_locally(workers):
    prefill, decode = workers
    calls = []

    async def counting(request_json):
        calls.append(request_json)
        return await prefill.prefill(request_json)

    ids, served, _, _ = run(decode, [3, 1, 4, 1, 5, 9], GREEDY, counting, rid="short")
    assert served.prefill_mode == "local" and not calls and len(ids) == 10


def test_dead_prefill_worker_falls_back_to_local_prefill(tiny_model_dir, workers):
    _, decode = workers
    reference = LLMEngine.from_model_dir(tiny_model_dir, CONFIG)
    prompt = list(range(100, 160))
    [want] = reference.generate([prompt], GREEDY)

    async def dead(_request_json):
        raise ConnectionError("prefill replica is gone")

    fast = DisaggConfig(local_prefill_threshold=16, transfer_deadline_s=1.0)
    old, decode.config = decode.config, fast
    try:
        ids, served, _, _ = run(decode, prompt, GREEDY, dead, replica="prefill-9", rid="dead")
    finally:
        decode.config = old
    assert ids == want.token_ids
    assert served.prefill_mode == "fallback"
    assert decode.metrics()["kv_usage"] == 0.0


def test_workers_report_every_autoscaling_figure(workers):
    """What each replica hands its pool's autoscaler (cluster/app.py takes exactly
    REPORTED_METRICS from metrics()): after a stream, decode's time to first token and
    its time between tokens, each no longer than the stream took."""
    prefill, decode = workers
    started = time.monotonic()
    ids, _, _, _ = run(decode, list(range(1, 9)), GREEDY, rid="figures")
    took = time.monotonic() - started
    assert len(ids) == 10
    for worker in (prefill, decode):
        assert set(REPORTED_METRICS) <= set(worker.metrics())
    m = decode.metrics()
    assert 0 < m["ttft_s"] <= took and 0 < m["itl_s"] <= took
