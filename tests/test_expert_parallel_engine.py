"""A worker of N = 2 expert-parallel ranks on CPU (rank 0 here, rank 1 a spawned follower
process, a real gloo group) against the one-process engine on the tiny model: greedy
tokens identical, logprobs equal within fp32 tolerance, both dispatchers; a follower
killed mid-generation fails the step with an error naming it and turns health false."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tandem.workers.engine.async_engine import AsyncLLMEngine, EngineDeadError
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.runner import ModelRunner
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.expert_parallel.config import ExpertParallelConfig
from tandem.workers.expert_parallel.engine import (
    ExpertParallelFailure,
    ExpertParallelRunner,
    build_engine,
)
from tandem.workers.expert_parallel.placement import ExpertPlacement
from tandem.workers.expert_parallel.rank_model import expert_nbytes
from tandem.workers.expert_parallel.step_messages import StepInputs
from tandem.workers.synthetic.checkpoint_writer import tiny_config, write_random_checkpoint

ENGINE = EngineConfig(device="cpu", kv_cache_tokens=1024, max_num_batched_tokens=32,
                      max_num_seqs=8)
# The tiny model's sliding window is 16: the first prompt is longer, and 32-token step
# budgets split it into prefill chunks; the second decodes beside it.
PROMPTS = [list(range(3, 43)), [7, 8, 9]]
TOKENS = 64


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    engine = LLMEngine.from_model_dir(tiny_model_dir, ENGINE)
    return engine.generate(PROMPTS, _greedy(TOKENS))


def test_step_inputs_round_trip():
    step = StepInputs(
        token_ids=(5, 6, 7, 9), seq_lens=(7, 12), num_new_tokens=(3, 1),
        block_tables=(((4, 1), (2, -1, 8)), ((0, 3), (-1, -1, 6))),
    )
    header, body = step.encode()
    assert StepInputs.decode(header, body, num_groups=2) == step
    assert step.positions() == [4, 5, 6, 11]
    with pytest.raises(ValueError, match="body"):
        StepInputs.decode(header, body[:-1], num_groups=2)


def test_config_names_the_bad_field():
    for kwargs, field in [({"size": 0}, "size"), ({"placement": "x"}, "placement"),
                          ({"dispatch": "x"}, "dispatch"), ({"timeout_s": 0}, "timeout_s")]:
        with pytest.raises(ValueError, match=field):
            ExpertParallelConfig(**kwargs)


def test_one_rank_is_the_plain_engine(tiny_model_dir):
    engine = build_engine(tiny_model_dir, ENGINE, ExpertParallelConfig(size=1))
    assert type(engine.runner) is ModelRunner


@pytest.mark.parametrize(("dispatch", "placement", "tokens"),
                         [("replicated", "round_robin", TOKENS), ("all_to_all", "contiguous", 16)])
def test_two_ranks_equal_one_process(tiny_model_dir, reference, dispatch, placement, tokens):
    ep = ExpertParallelConfig(size=2, dispatch=dispatch, placement=placement, timeout_s=60)
    engine = build_engine(tiny_model_dir, ENGINE, ep)
    try:
        assert isinstance(engine.runner, ExpertParallelRunner)
        # Rank 0 holds 3 of the 6 experts.
        assert engine.runner.model.layers[0].mlp.experts.down_proj_blocks.shape[0] == 3
        got = engine.generate(PROMPTS, _greedy(tokens))
    finally:
        engine.runner.close()
    for ours, theirs in zip(got, reference, strict=True):
        assert ours.token_ids == theirs.token_ids[:tokens]
        for a, b in zip(ours.logprobs, theirs.logprobs, strict=False):
            assert a.token_id == b.token_id
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)
    for p in engine.runner.followers.processes:
        assert p.returncode == 0  # STOPped cleanly


def test_killed_follower_fails_the_worker(tiny_model_dir):
    ep = ExpertParallelConfig(size=2, timeout_s=20)
    engine = build_engine(tiny_model_dir, ENGINE, ep)
    follower = engine.runner.followers.processes[0]
    async_engine = AsyncLLMEngine(engine)

    async def scenario() -> tuple[list[int], BaseException | None, bool, bool]:
        assert await async_engine.check_health(timeout_s=30)
        received: list[int] = []
        error = None
        try:
            async for out in async_engine.generate([3, 4, 5], _greedy(200)):
                received.extend(out.token_ids)
                if len(received) >= 3 and follower.poll() is None:
                    follower.kill()  # mid-generation
        except Exception as err:  # the stream ends with the engine's failure
            error = err
        healthy = await async_engine.check_health(timeout_s=30)
        return received, error, healthy, follower.poll() is not None

    try:
        received, error, healthy, reaped = asyncio.run(scenario())
    finally:
        async_engine.shutdown()
    assert 3 <= len(received) < 200
    # The stream ends with the engine's death, whose cause names the lost rank.
    assert isinstance(error, EngineDeadError), repr(error)
    assert "ExpertParallelFailure" in str(error) and "rank 1 exited with code -9" in str(error)
    assert not healthy and reaped
    with pytest.raises(ExpertParallelFailure, match="rank 1"):
        engine.runner.check_alive()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem.cluster.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_ep_two_ranks_matches_one(tiny_model_dir, reference):
    run = _cli("generate", "--model", str(tiny_model_dir), "--prompt-ids",
               ",".join(map(str, PROMPTS[1])), "--max-tokens", "8", "--temperature", "0",
               "--device", "cpu", "--json", "--ep", "2", "--ep-placement", "round_robin")
    assert run.returncode == 0, run.stderr
    [line] = run.stdout.splitlines()
    # Without ignore_eos the CLI may stop early at an eos the reference ran past.
    tokens = json.loads(line)["token_ids"]
    assert tokens and tokens == reference[1].token_ids[: len(tokens)]


def test_cli_rejects_bad_ep(tiny_model_dir):
    run = _cli("generate", "--model", str(tiny_model_dir), "--prompt-ids", "1,2",
               "--max-tokens", "2", "--ep", "2", "--ep-dispatch", "broadcast")
    assert run.returncode != 0 and "dispatch" in run.stderr


TIGHT = EngineConfig(device="cpu", kv_cache_tokens=96, max_num_batched_tokens=32,
                     max_num_seqs=4, block_size=16)
# Six full-attention blocks for three growing sequences: preemption is certain.
SHARED = list(range(200, 232))  # two blocks of shared prefix


def _scenario(engine: LLMEngine) -> tuple[dict, dict, float]:
    """A warm prefix, then three requests sharing it under a KV budget that forces
    preemption, one of them aborted mid-way; returns tokens, usage, preemptions."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine.generate([SHARED + [1]], SamplingParams(temperature=0.0, max_tokens=1))
    for n in range(3):
        engine.add_request(SHARED + [10 + n, 11 + n], params, request_id=f"r{n}")
    tokens: dict[str, list[int]] = {f"r{n}": [] for n in range(3)}
    usage = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
            if out.finished:
                usage[out.request_id] = (out.usage, out.finish_reason)
        if len(tokens["r1"]) >= 17 and "r1" not in usage:  # past the KV crunch
            out = engine.abort("r1")
            usage["r1"] = (out.usage, out.finish_reason)
    return tokens, usage, engine.metrics()["preemptions"]


def test_prefix_hits_preemption_and_abort_as_in_one_process(tiny_model_dir):
    expected = _scenario(LLMEngine.from_model_dir(tiny_model_dir, TIGHT))
    tokens, usage, preemptions = expected
    # The scenario exercises what it claims to, in one process already.
    assert preemptions > 0
    assert usage["r1"][1] == "abort" and len(tokens["r0"]) == 24
    assert any(u.cached_tokens >= 32 for u, _ in usage.values())
    engine = build_engine(tiny_model_dir, TIGHT, ExpertParallelConfig(size=2, timeout_s=60))
    try:
        assert _scenario(engine) == expected
    finally:
        engine.runner.close()


@pytest.mark.parametrize(
    ("experts", "top_k", "ranks", "placement", "dispatch", "tokens"),
    [(5, 2, 2, "contiguous", "replicated", 64), (8, 3, 4, "round_robin", "all_to_all", 64)],
)
def test_random_checkpoints_odd_splits(tiny_model_dir, tmp_path, experts, top_k, ranks,
                                       placement, dispatch, tokens):
    """Random checkpoints of odd expert counts (uneven splits), the 16-token window shorter
    than the 40-token prompt; the tiny model's tokenizer for detokenizing."""
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    config = tiny_config(num_local_experts=experts, num_experts_per_tok=top_k,
                         vocab_size=vocab)
    model_dir = write_random_checkpoint(tmp_path / "ckpt", config, seed=experts)
    shutil.copy(tiny_model_dir / "tokenizer.json", model_dir / "tokenizer.json")
    prompts, params = [list(range(3, 43))], _greedy(tokens)
    one_process = LLMEngine.from_model_dir(model_dir, ENGINE)
    [expected] = one_process.generate(prompts, params)
    ep = ExpertParallelConfig(size=ranks, placement=placement, dispatch=dispatch,
                              timeout_s=60)
    engine = build_engine(model_dir, ENGINE, ep)
    try:
        [got] = engine.generate(prompts, params)
        # Each rank's memory holds only its experts: rank 0's model here, the followers'
        # as they reported them from their own processes.
        loads = {0: (engine.runner.model.expert_ids, expert_nbytes(engine.runner.model))}
        for rank, load in engine.runner.followers.loaded.items():
            loads[rank] = (load.expert_ids, load.expert_nbytes)
    finally:
        engine.runner.close()
    per_expert = expert_nbytes(one_process.runner.model) // experts
    assert per_expert > 0 and sorted(loads) == list(range(ranks))
    split = ExpertPlacement(experts, ranks, placement)
    for rank, (held, nbytes) in loads.items():
        assert held == split.experts_of(rank)
        assert nbytes == len(held) * per_expert, rank
    assert sum(nbytes for _, nbytes in loads.values()) == expert_nbytes(one_process.runner.model)
    # 5 on 2: one rank holds one expert fewer; 8 on 4: two each.
    assert len({len(held) for held, _ in loads.values()}) == (1 if experts % ranks == 0 else 2)
    assert got.token_ids == expected.token_ids and len(got.token_ids) == tokens
    for a, b in zip(got.logprobs, expected.logprobs, strict=True):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)


def test_idle_past_the_timeout_then_a_hung_follower(tiny_model_dir, reference):
    """Heartbeats keep an idle worker alive past the group timeout; a follower that stops
    answering (SIGSTOP, not dead) fails the next step at the timeout instead of hanging."""
    ep = ExpertParallelConfig(size=2, timeout_s=5)
    engine = build_engine(tiny_model_dir, ENGINE, ep)
    followers = engine.runner.followers
    follower = followers.processes[0]
    try:
        # Four heartbeats at timeout / 3 apart: idle for longer than the timeout.
        assert followers.wait_heartbeats(4, timeout_s=120)
        [got] = engine.generate([PROMPTS[1]], _greedy(4))
        assert got.token_ids == reference[1].token_ids[:4]
        os.kill(follower.pid, signal.SIGSTOP)
        with pytest.raises(ExpertParallelFailure):
            engine.generate([PROMPTS[1]], _greedy(4))
        # The worker took the stopped rank down with it.
        assert follower.poll() is not None
        with pytest.raises(ExpertParallelFailure):
            engine.runner.check_alive()
    finally:
        if follower.poll() is None:
            follower.kill()
        engine.runner.close()


def test_follower_that_fails_to_load_fails_the_start(tmp_path):
    """A checkpoint whose only bad bytes lie in rank 1's experts: rank 0 loads its half,
    rank 1 refuses its own and exits, and the start fails naming it (no hang)."""
    from safetensors.torch import load_file, save_file

    config = tiny_config(num_local_experts=4, num_experts_per_tok=2)
    path = write_random_checkpoint(tmp_path, config, seed=3)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.2.mlp.experts.gate_up_proj_scales"][3, 0, 0] = 255  # NaN in E8M0
    save_file(tensors, str(path / "model.safetensors"))
    ep = ExpertParallelConfig(size=2, placement="contiguous", timeout_s=30,
                              start_timeout_s=120)
    with pytest.raises(ExpertParallelFailure, match="rank 1 exited with code 1"):
        build_engine(path, ENGINE, ep)
