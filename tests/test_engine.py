"""The engine end to end on the tiny checkpoint (CPU, fp32).

The independent reference for greedy output is transformers' GptOssForCausalLM loaded
from the same directory; the engine is also checked against itself run alone, which is
what batch invariance means.
"""

from __future__ import annotations

import random

import pytest

from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams, SamplingParamsError
from tandem.workers.kv.block_hash import hash_prompt_blocks
from tandem.workers.kv.block_pool import BlockRemoved, BlockStored
from tests.support.hf_reference import hf_greedy

BLOCK = 8


def make_engine(model_dir, **overrides) -> LLMEngine:
    config = dict(
        device="cpu",
        dtype="float32",
        block_size=BLOCK,
        kv_cache_tokens=4096,
        max_num_seqs=16,
        max_num_batched_tokens=96,
    )
    config.update(overrides)
    return LLMEngine.from_model_dir(model_dir, EngineConfig(**config))


def mixed_prompts(vocab: int, n: int = 16, seed: int = 1) -> list[list[int]]:
    """Prompts of mixed lengths (1 to 70 tokens, several windows long); every fourth
    shares a 40-token prefix with the previous one."""
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    for i in range(n):
        if i % 4 == 1:
            prompts.append(
                prompts[-1][:40] + [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
            )
        else:
            length = [1, 5, 17, 33, 70][i % 5]
            prompts.append([rng.randrange(vocab) for _ in range(length)])
    return prompts


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir)


def test_batch_invariance_and_transformers_parity(tiny_model_dir, engine):
    prompts = mixed_prompts(engine.config.vocab_size)
    batched = engine.generate(prompts, GREEDY)
    alone = make_engine(tiny_model_dir, enable_prefix_caching=False)
    for prompt, together in zip(prompts, batched, strict=True):
        [single] = alone.generate([prompt], GREEDY)
        assert together.token_ids == single.token_ids
        assert together.finish_reason == "length"
        assert len(together.token_ids) == GREEDY.max_tokens
    # transformers is slow on CPU: check a spread of the prompts, long and shared ones too.
    for i in (0, 1, 4, 9, 13):
        assert batched[i].token_ids == hf_greedy(tiny_model_dir, prompts[i], GREEDY.max_tokens), i
    assert max(engine.kv.usage) == 0.0


def test_prefix_cache_hit_reports_exact_cached_tokens(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    vocab = eng.config.vocab_size
    rng = random.Random(7)
    shared = [rng.randrange(vocab) for _ in range(3 * BLOCK)]
    first = shared + [rng.randrange(vocab) for _ in range(5)]
    second = shared + [rng.randrange(vocab) for _ in range(6)]
    [a] = eng.generate([first], GREEDY)
    # Every full block of the first request (prompt + computed output, 3 + 1 blocks of 8)
    # was stored, in each KV group, under the chained hashes the router will compute.
    computed = first + a.token_ids[:-1]
    expected = hash_prompt_blocks(computed, BLOCK)
    events = eng.kv.drain_events()
    for group in ("full", "sliding"):
        stored = [e.block_hash for e in events if isinstance(e, BlockStored) and e.group == group]
        assert stored == expected, group
    [b] = eng.generate([second], GREEDY)
    assert b.usage.cached_tokens == 3 * BLOCK
    assert a.usage.cached_tokens == 0
    fresh = make_engine(tiny_model_dir, enable_prefix_caching=False)
    [b_alone] = fresh.generate([second], GREEDY)
    assert b.token_ids == b_alone.token_ids
    assert b_alone.usage.cached_tokens == 0


def test_eviction_emits_removed_events(tiny_model_dir):
    # 10 blocks per group: the second request needs blocks the first left cached.
    eng = make_engine(tiny_model_dir, kv_cache_tokens=10 * BLOCK, max_num_seqs=1)
    rng = random.Random(9)
    first = [rng.randrange(eng.config.vocab_size) for _ in range(5 * BLOCK)]
    second = [rng.randrange(eng.config.vocab_size) for _ in range(7 * BLOCK)]
    [a] = eng.generate([first], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    eng.kv.drain_events()
    eng.generate([second], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    removed = [
        e.block_hash
        for e in eng.kv.drain_events()
        if isinstance(e, BlockRemoved) and e.group == "full"
    ]
    first_hashes = hash_prompt_blocks(first + a.token_ids[:-1], BLOCK)
    # Freed blocks are evicted least recently used first; a request's tail blocks were
    # freed first, so the first request's blocks go from its end.
    assert removed and set(removed) <= set(first_hashes)
    assert removed == [h for h in reversed(first_hashes) if h in set(removed)]


def test_preemption_keeps_outputs_identical(tiny_model_dir, engine):
    prompts = mixed_prompts(engine.config.vocab_size, n=8, seed=3)
    expected = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    # 12 blocks of 8 tokens cannot hold 8 sequences of up to 82 tokens at once.
    tight = make_engine(tiny_model_dir, kv_cache_tokens=12 * BLOCK, enable_prefix_caching=False)
    got = [c.token_ids for c in tight.generate(prompts, GREEDY)]
    assert got == expected
    assert tight.metrics()["preemptions"] > 0


def test_abort_frees_every_block(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    free_before = [pool.num_free for pool in eng.kv.pools]
    prompts = mixed_prompts(eng.config.vocab_size, n=6, seed=5)
    ids = [eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=50)) for p in prompts]
    eng.step()
    eng.step()  # some in prefill, some decoding
    for request_id in ids:
        out = eng.abort(request_id)
        assert out is not None and out.finished and out.finish_reason == "abort"
    assert not eng.has_unfinished()
    assert max(eng.kv.usage) == 0.0
    # Freed blocks stay cached (evictable) but every block is free again.
    assert [pool.num_free for pool in eng.kv.pools] == free_before
    eng.kv.check_integrity()


def test_seeded_sampling_reproducible_across_batches(tiny_model_dir, engine):
    vocab = engine.config.vocab_size
    rng = random.Random(11)
    target = [rng.randrange(vocab) for _ in range(20)]
    params = SamplingParams(
        temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=10, ignore_eos=True
    )
    [alone] = engine.generate([target], params)
    others = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 31, 9)]
    noise = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    mixed = engine.generate(others[:2] + [target] + others[2:], [noise, noise, params, noise])
    assert mixed[2].token_ids == alone.token_ids
    other_seed = engine.generate(
        [target],
        SamplingParams(
            temperature=0.9, top_p=0.95, top_k=50, seed=4321, max_tokens=10, ignore_eos=True
        ),
    )
    assert other_seed[0].token_ids != alone.token_ids


def test_stop_rules(engine):
    vocab = engine.config.vocab_size
    prompt = [5, 6, 7, 8, 9]
    [free] = engine.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    )
    stop_at = free.token_ids[3]
    first_index = free.token_ids.index(stop_at)
    [stopped] = engine.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=(stop_at,))
    )
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first_index + 1]
    # min_tokens masks the stop token, so it cannot end the request early.
    [held] = engine.generate(
        [prompt],
        SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, stop_token_ids=(stop_at,)),
    )
    assert len(held.token_ids) == 8 and held.finish_reason == "length"
    assert stop_at not in held.token_ids
    # A stop string taken from the free-running text ends generation; it is not returned.
    text = free.text
    if len(text) >= 4:
        needle = text[len(text) // 2 : len(text) // 2 + 2]
        [by_string] = engine.generate(
            [prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop=(needle,))
        )
        assert by_string.finish_reason == "stop"
        assert by_string.text == text[: text.index(needle)]
    assert vocab > 0


def test_streamed_text_equals_full_decode(engine):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    deltas = list(engine.stream([1, 2, 3, 4], params))
    ids = [t for d in deltas for t in d.token_ids]
    assert "".join(d.text_delta for d in deltas) == engine.tokenizer.decode(ids)
    assert deltas[-1].finished and deltas[-1].usage.completion_tokens == 20
    assert all(not d.finished for d in deltas[:-1])


def test_logprobs_returned_on_request(engine):
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=2)
    [out] = engine.generate([[3, 1, 4, 1, 5]], params)
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    for lp in out.logprobs:
        assert len(lp.top) == 2 and lp.top[0][0] == lp.token_id  # greedy: the best one
        assert lp.logprob <= 0.0


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([], SamplingParams(max_tokens=4), "prompt"),
        ([1] * 4095, SamplingParams(max_tokens=4), "max_tokens"),
        ([1] * 4096, SamplingParams(max_tokens=4), "prompt"),
        ([10**9], SamplingParams(max_tokens=4), "prompt"),
        ([1, 2], SamplingParams(max_tokens=4, stop_token_ids=(10**9,)), "stop_token_ids"),
    ],
)
def test_invalid_requests_rejected_before_admission(engine, prompt, params, field):
    with pytest.raises(SamplingParamsError) as info:
        engine.add_request(prompt, params)
    assert info.value.field == field
    assert not engine.has_unfinished()
