"""Issue 17's acceptance through a real Ray cluster on CPU: one prefill and one decode
replica of 2 expert-parallel ranks each (the Serve replica is rank 0 and starts rank 1 as
a process; gloo), a real redis-server, gRPC over loopback. Prompts long enough for remote
prefill (their KV moves prefill rank 0 -> decode rank 0 -> decode rank 1) and one short
enough to stay on the decode worker: outputs equal the one-process engine's token for
token (greedy), and every block is released after.

The two pools run different dispatchers (prefill replicated, decode all-to-all) and
placements, so both travel through the cluster."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tandem.cluster.client import TandemClient
from tandem.cluster.config import DECODE, PREFILL
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams
from tests.support.cluster import STREAM_TIMEOUT_S, TEST_ENGINE, serve_cluster, wait_for

THRESHOLD = 16
EXPERT_PARALLEL = {
    "prefill": {"size": 2, "placement": "round_robin", "dispatch": "replicated", "timeout_s": 60},
    "decode": {"size": 2, "placement": "contiguous", "dispatch": "all_to_all", "timeout_s": 60},
}
TWO_RANKS = {"ray_actor_options": {"num_cpus": 2}}
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    with serve_cluster(
        str(tiny_model_dir),
        app="tandem-ep",
        cluster_name="ep",
        engine=TEST_ENGINE,
        placement={"prefill": "least_loaded", "decode": "least_loaded"},
        prefill=1,
        decode=1,
        ingress=1,
        disagg={"local_prefill_threshold": THRESHOLD, "transfer_deadline_s": 60.0},
        deployment_options={PREFILL: TWO_RANKS, DECODE: TWO_RANKS},
        more_args={"expert_parallel": EXPERT_PARALLEL},
    ) as running:
        yield running


def _followers(model_dir: str) -> list[tuple[int, dict]]:
    """(pid, FollowerArgs) of the live expert-parallel rank processes serving `model_dir`
    (this session's own checkpoint directory, so no other test's processes count)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if "tandem.workers.expert_parallel.follower" in cmd and cmd[-1].startswith("{"):
            args = json.loads(cmd[-1])
            if args["model_dir"] == model_dir:
                found.append((proc.pid, args))
    return found


def _stream(target: str, prompt: list[int]):
    with TandemClient(target) as client:
        chunks = list(
            client.generate(
                prompt,
                timeout=STREAM_TIMEOUT_S,
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                ignore_eos=True,
            )
        )
    return [t for c in chunks for t in c.token_ids], chunks[-1]


def test_two_rank_workers_serve_pd_as_one_process(cluster, tiny_model_dir):
    # Each worker replica runs its rank 1 as a process of its own.
    ranks = _followers(str(tiny_model_dir))
    assert sorted((a["rank"], a["ep"]["dispatch"]) for _, a in ranks) == [
        (1, "all_to_all"),
        (1, "replicated"),
    ]
    reference = LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(**TEST_ENGINE))
    rng = random.Random(17)
    # 12: prefilled on the decode worker; 60 and 200 (two 128-token prefill chunks): remote.
    lengths = [12, 60, 200]
    prompts = [[rng.randrange(reference.config.vocab_size) for _ in range(n)] for n in lengths]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = [out.token_ids for out in reference.generate(prompts, params)]
    # At once: the workers batch them (the decode worker decodes the short one while the
    # long ones' KV arrives).
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: _stream(cluster.target, p), prompts))
    [prefill_id], [decode_id] = cluster.replicas("prefill"), cluster.replicas("decode")
    for n, tokens, (got, last) in zip(lengths, want, results, strict=True):
        assert got == tokens, n
        assert last.usage.prompt_tokens == n and last.usage.completion_tokens == MAX_TOKENS
        assert last.served_by.decode_replica == decode_id
        if n < THRESHOLD:
            assert last.served_by.prefill_replica == "" and last.timings.kv_transfer_s == 0.0
        else:
            assert last.served_by.prefill_replica == prefill_id, (n, last.served_by)
            assert last.timings.kv_transfer_s > 0
    metrics = cluster.worker_metrics("decode", decode_id)
    assert metrics["transfers"] == 2 and metrics["fallbacks"] == 0

    def released() -> bool:
        return all(
            cluster.worker_metrics(role, rid)["kv_usage"] == 0.0
            for role, rid in (("prefill", prefill_id), ("decode", decode_id))
        )

    wait_for(released, 10, "every KV block released on both workers")
    # Both ranks of both workers are still up.
    assert len(_followers(str(tiny_model_dir))) == 2


def test_a_killed_rank_takes_its_replica_down_and_serve_replaces_it(cluster, tiny_model_dir):
    """The decode worker's rank 1 is killed: the replica's health check fails, Serve
    replaces the replica (a new one of 2 ranks), and requests are served as before."""
    [old] = cluster.replicas("decode")
    [(victim, _)] = [
        (pid, a)
        for pid, a in _followers(str(tiny_model_dir))
        if a["ep"]["dispatch"] == "all_to_all"
    ]
    psutil.Process(victim).kill()

    def replaced() -> list[str] | None:
        live = cluster.replicas("decode")
        return None if old in live else live  # [] while the new one starts: falsy

    [new] = wait_for(replaced, 120, "the decode replica replaced")
    reference = LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(**TEST_ENGINE))
    prompt = [random.Random(5).randrange(reference.config.vocab_size) for _ in range(50)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    [want] = reference.generate([prompt], params)
    got, last = _stream(cluster.target, prompt)
    assert got == want.token_ids
    assert last.served_by.decode_replica == new and last.served_by.prefill_replica
    # The new replica runs its own rank 1; the killed one is gone.
    ranks = _followers(str(tiny_model_dir))
    assert victim not in [pid for pid, _ in ranks] and len(ranks) == 2
