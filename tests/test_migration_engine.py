"""Resuming a request on another engine (stream migration), without Ray: an engine given
the prompt plus the first k tokens another engine streamed produces exactly the rest of
that engine's undisturbed output (tokens, text, usage), greedy and seeded, with stop
strings that span the boundary; and the decode worker's message carries those tokens.
"""

from __future__ import annotations

import random

import pytest

from tandem.workers.disagg.roles import GenerateMessage
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.outputs import RequestOutput
from tandem.workers.engine.sampling_params import SamplingParams, SamplingParamsError
from tests.support.cluster import TEST_ENGINE

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
SEEDED = SamplingParams(
    temperature=0.9,
    top_p=0.95,
    top_k=40,
    seed=1234,
    max_tokens=24,
    ignore_eos=True,
    frequency_penalty=0.4,
    repetition_penalty=1.1,
)


@pytest.fixture(scope="module")
def engines(tiny_model_dir) -> tuple[LLMEngine, LLMEngine]:
    """The engine a request starts on, and the one it moves to (another process in a
    cluster; another engine object here, with its own caches and generators)."""
    return tuple(
        LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(**TEST_ENGINE)) for _ in "ab"
    )


def run(
    engine: LLMEngine, prompt: list[int], params: SamplingParams, resumed: list[int] = ()
) -> list[RequestOutput]:
    """Every delta of one request, with a batch-mate running beside it (so the request
    is decoded in a batch, as in a server)."""
    request_id = engine.add_request(prompt, params, output_token_ids=resumed)
    mate = engine.add_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=40))
    deltas = []
    while not (deltas and deltas[-1].finished):
        deltas += [out for out in engine.step() if out.request_id == request_id]
    engine.abort(mate)
    return deltas


def tokens(deltas: list[RequestOutput]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text(deltas: list[RequestOutput]) -> str:
    return "".join(d.text_delta for d in deltas)


def streamed_before(deltas: list[RequestOutput], k: int) -> list[RequestOutput]:
    """The deltas a client had seen once k tokens were streamed (one token a delta)."""
    assert all(len(d.token_ids) == 1 for d in deltas)
    return deltas[:k]


def prompt_of(engine: LLMEngine, seed: int, n: int = 21) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(engine.config.vocab_size) for _ in range(n)]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_resumed_request_continues_the_undisturbed_output(engines, params):
    origin, other = engines
    prompt = prompt_of(origin, 1)
    full = run(origin, prompt, params)
    assert len(tokens(full)) == params.max_tokens
    for k in (1, 7, params.max_tokens - 1):
        before = streamed_before(full, k)
        after = run(other, prompt, params, tokens(before))
        assert tokens(before) + tokens(after) == tokens(full), k
        assert text(before) + text(after) == text(full), k
        last = after[-1]
        assert last.finish_reason == full[-1].finish_reason == "length"
        assert last.usage.prompt_tokens == len(prompt)
        assert last.usage.completion_tokens == params.max_tokens
        if params.logprobs is not None:
            got = [lp.token_id for d in after for lp in d.logprobs]
            assert got == tokens(full)[k:]


def test_seeded_resume_differs_without_the_generator_advanced(engines):
    """The check above could pass by luck if the draws did not matter: a request with
    another seed, resumed from the same tokens, samples something else."""
    origin, other = engines
    prompt = prompt_of(origin, 2)
    full = tokens(run(origin, prompt, SEEDED))
    k = 4
    reseeded = SamplingParams(**{**SEEDED.__dict__, "seed": SEEDED.seed + 1})
    assert tokens(run(other, prompt, reseeded, full[:k])) != full[k:]


def test_stop_string_across_the_boundary(engines):
    """A stop string whose first character was streamed (held back) before the move and
    whose last arrives after it still stops the request, and no text is lost or
    repeated."""
    origin, other = engines
    prompt = prompt_of(origin, 3)
    free = run(origin, prompt, GREEDY)
    pieces = [d.text_delta for d in free]
    whole = "".join(pieces)
    # A boundary k where token k-1 ends with a character and token k starts with one,
    # and the two characters together occur nowhere earlier.
    for k in range(2, len(pieces)):
        if not (pieces[k - 1] and pieces[k]):
            continue
        needle = pieces[k - 1][-1] + pieces[k][0]
        at = len("".join(pieces[:k])) - 1
        if whole.find(needle) == at:
            break
    else:
        pytest.fail(f"no usable token boundary in {pieces!r}")
    params = SamplingParams(**{**GREEDY.__dict__, "stop": (needle,)})
    stopped = run(origin, prompt, params)
    assert stopped[-1].finish_reason == "stop" and len(stopped) == k + 1
    before = streamed_before(stopped, k)
    # The needle's first character is held back, not yet streamed.
    assert text(before) == whole[:at]
    after = run(other, prompt, params, tokens(before))
    assert tokens(before) + tokens(after) == tokens(stopped)
    assert text(before) + text(after) == text(stopped) == whole[:at]
    assert after[-1].finish_reason == "stop"


def test_already_finished_output_is_refused_naming_the_field(engines):
    origin, _ = engines
    prompt = prompt_of(origin, 4)
    done = tokens(run(origin, prompt, GREEDY))
    with pytest.raises(SamplingParamsError) as err:
        origin.add_request(prompt, GREEDY, output_token_ids=done)
    assert err.value.field == "output_token_ids"
    stop_at = done[2]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=(stop_at,))
    with pytest.raises(SamplingParamsError) as err:
        origin.add_request(prompt, params, output_token_ids=done[:5])
    assert err.value.field == "output_token_ids"
    with pytest.raises(SamplingParamsError) as err:
        origin.add_request(prompt, GREEDY, output_token_ids=[origin.config.vocab_size])
    assert err.value.field == "output_token_ids"
    assert not origin.has_unfinished()


def test_generate_message_carries_the_streamed_tokens():
    msg = GenerateMessage("r1", (1, 2, 3), SEEDED, output_token_ids=(9, 8))
    assert GenerateMessage.from_json(msg.to_json()) == msg
    # A version-1 message (no version, no output tokens) still reads.
    old = '{"request_id": "r0", "prompt_token_ids": [4], "params": {"max_tokens": 3}}'
    assert GenerateMessage.from_json(old).output_token_ids == ()
    with pytest.raises(ValueError, match="version 3"):
        GenerateMessage.from_json(msg.to_json().replace('"version": 2', '"version": 3'))
