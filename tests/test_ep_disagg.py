"""Disaggregation with expert-parallel workers, without Ray: a prefill and a decode worker
over a real gloo pair, one of them of 2 ranks (rank 1 a spawned follower), checked token
for token against the one-process engine. The prompt's KV reaches the decode worker's
rank 0 by transfer and its follower by broadcast (workers/expert_parallel/kv_replica.py);
a follower without it would attend over zeros and sample other tokens.

Also: the KV layout names how a worker's heads are split (kv_head_shards), not its rank
count, and a pair of differently split workers is refused at set-up."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from tandem.workers.disagg.roles import (
    DecodeWorker,
    DisaggConfig,
    GenerateMessage,
    PrefillWorker,
    decode_delta,
)
from tandem.workers.disagg.transfer import KVLayout, KVLayoutMismatch, KVReceiver, KVSender
from tandem.workers.engine.async_engine import AsyncLLMEngine
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.expert_parallel.config import ExpertParallelConfig
from tandem.workers.expert_parallel.engine import ExpertParallelRunner, build_engine
from tests.support.kv_sender import HOST, make_caches

CONFIG = EngineConfig(device="cpu", block_size=8, kv_cache_tokens=2048, max_num_batched_tokens=64)
EP2 = ExpertParallelConfig(size=2, placement="round_robin", timeout_s=60)
DISAGG = DisaggConfig(local_prefill_threshold=16, transfer_deadline_s=30.0)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _engine(model_dir, ep: ExpertParallelConfig | None) -> AsyncLLMEngine:
    return AsyncLLMEngine(build_engine(model_dir, CONFIG, ep))


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    """One-rank workers of both roles."""
    prefill = PrefillWorker(_engine(tiny_model_dir, None), "prefill-one", "tiny", HOST)
    decode = DecodeWorker(_engine(tiny_model_dir, None), "decode-one", "tiny", HOST, DISAGG)
    yield {"prefill": prefill, "decode": decode}
    decode.close()
    prefill.close()


def _ep_worker(tiny_model_dir, role: str) -> PrefillWorker | DecodeWorker:
    """A 2-rank worker (a process belongs to one expert-parallel group: one at a time)."""
    engine = _engine(tiny_model_dir, EP2)
    if role == "prefill":
        return PrefillWorker(engine, "prefill-ep2", "tiny", HOST)
    return DecodeWorker(engine, "decode-ep2", "tiny", HOST, DISAGG)


def _run(decode: DecodeWorker, prefill: PrefillWorker, prompt: list[int], rid: str):
    async def go():
        ids, served = [], None
        message = GenerateMessage(rid, tuple(prompt), GREEDY).to_json()
        async for text in decode.generate(message, prefill.prefill, prefill.replica_id):
            out, info = decode_delta(text)
            ids.extend(out.token_ids)
            if out.finished:
                served = info
        return ids, served

    return asyncio.run(go())


@pytest.mark.parametrize("ep_role", ["decode", "prefill"])
def test_remote_prefill_between_rank_counts_equals_one_process(tiny_model_dir, plain, ep_role):
    ep_worker = _ep_worker(tiny_model_dir, ep_role)
    try:
        assert isinstance(ep_worker.engine.engine.runner, ExpertParallelRunner)
        roles = {**plain, ep_role: ep_worker}
        prefill, decode = roles["prefill"], roles["decode"]
        reference = LLMEngine.from_model_dir(tiny_model_dir, CONFIG)
        rng = random.Random(ep_role)
        # Longer than the tiny model's 16-token window and than the local threshold.
        vocab = reference.config.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (45, 70)]
        for i, prompt in enumerate(prompts):
            [want] = reference.generate([prompt], GREEDY)
            ids, served = _run(decode, prefill, prompt, f"{ep_role}-{i}")
            assert served.prefill_mode == "remote", served
            assert served.prefill_replica == prefill.replica_id
            assert ids == want.token_ids and len(ids) == GREEDY.max_tokens
        assert decode.metrics()["fallbacks"] == 0.0
        ep_worker.engine.engine.runner.check_alive()
        for worker in (prefill, decode):
            assert worker.metrics()["kv_usage"] == 0.0
    finally:
        ep_worker.close()


# --------------------------------------------------------------------- the layout


def test_layout_names_the_head_split_not_the_rank_count():
    layout = KVLayout("tiny", "float32", 8, 4, (1, 0, 1, 0), 2, 16)
    assert layout.kv_head_shards == 1 and layout.heads_per_rank == 2
    split = KVLayout("tiny", "float32", 8, 4, (1, 0, 1, 0), 2, 16, kv_head_shards=2)
    assert split.heads_per_rank == 1 and split.block_bytes == layout.block_bytes // 2
    assert KVLayout.from_json(split.to_json()) == split
    # A rank of a split worker holds heads_per_rank heads per slot.
    caches = [(torch.zeros(3, 8, 1, 16), torch.zeros(3, 8, 1, 16)) for _ in range(4)]
    assert split.check_caches(caches) == [3, 3]
    with pytest.raises(ValueError, match="shape"):
        layout.check_caches(caches)
    with pytest.raises(ValueError, match="kv_head_shards 3 must divide num_kv_heads 2"):
        KVLayout("tiny", "float32", 8, 4, (1, 0, 1, 0), 2, 16, kv_head_shards=3)
    with pytest.raises(ValueError, match="kv_head_shards"):
        KVLayout("tiny", "float32", 8, 4, (1, 0, 1, 0), 2, 16, kv_head_shards=0)


def test_differently_split_heads_are_refused_at_pair_setup():
    """The decode side's heads whole, the prefill side's split in two: both ends refuse the
    pair at set-up, naming the field, before any block moves."""
    whole = KVLayout("tiny", "float32", 8, 4, (1, 0, 1, 0), 2, 16)
    split = KVLayout("tiny", "float32", 8, 4, (1, 0, 1, 0), 2, 16, kv_head_shards=2)
    receiver = KVReceiver("decode-0", whole, make_caches(whole, (6, 4), seed=1), HOST)
    # The split sender's rank holds one of the two heads.
    halves = [(k[:, :, :1].clone(), v[:, :, :1].clone()) for k, v in make_caches(whole, (6, 4), 2)]
    sender = KVSender("prefill-0", split, halves, HOST)
    try:
        ticket = receiver.expect("prefill-0", [[0], [1]], [[0], [0]], timeout_s=20.0)
        transfer = sender.begin(ticket, [[0], [0]])
        failure: list[BaseException] = []

        def send() -> None:
            try:
                for layer in range(whole.num_layers):
                    transfer.send_layer(layer)
                transfer.finish(1)
                transfer.wait()
            except BaseException as err:  # noqa: BLE001 - reported below
                failure.append(err)

        thread = threading.Thread(target=send)
        thread.start()
        with pytest.raises(KVLayoutMismatch, match="kv_head_shards 1 here vs 2 at peer"):
            receiver.recv(ticket)
        thread.join(30.0)
        assert not thread.is_alive()
        [err] = failure
        assert isinstance(err, KVLayoutMismatch) and "kv_head_shards 2 here vs 1 at peer" in str(
            err
        )
    finally:
        sender.close()
        receiver.close()
