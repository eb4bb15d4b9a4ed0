"""The LLM-aware router against the real thing.

Without Ray: the prefix index feeder over a real redis-server (exact index from the
workers' streams, catch-up of a late reader, expiry with the heartbeat), and the
placement section of the config.

With Ray (one cluster for the module): 2 ingress + 2 prefill + 3 decode replicas of the
tiny model on CPU, prefix-aware placement in both pools, and a multi-turn chat workload
(tests/cluster_fixtures.py) in the regime cache-aware routing is for: the conversations'
KV exceeds one worker's cache and fits in the decode pool's (see the workload test).
Checked: the prefix hit rate against an oracle that knows every cache (the same exact
index), and against round-robin on the same workers; that both ingress replicas build
the same index and make the same choices; and that ingress replicas killed and replaced
by Serve come back with the whole index.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import grpc
import pytest
import ray
import yaml

from tandem.cluster.client import TandemClient
from tandem.cluster.config import ConfigError, load_app_config, parse_args
from tandem.cluster.index_feeder import PrefixIndexFeeder
from tandem.cluster.metrics import RouterMetrics
from tandem.cluster.placement import prompt_digest
from tandem.cluster.workloads import ChatWorkload as ChatSessions
from tandem.router.policies import PrefixAwareConfig
from tandem.router.prefix_index import FULL, SLIDING, prompt_block_hashes
from tandem.workers.control_plane import (
    KVEvent,
    KVEventPublisher,
    KVEventReader,
    WorkerCapacity,
    WorkerInfo,
    WorkerRegistry,
)
from tandem.workers.kv.block_hash import hash_prompt_blocks
from tests.support.cluster import (
    STREAM_TIMEOUT_S,
    ChatWorkload,
    hit_rate,
    run_chat_workload,
    serve_cluster,
    wait_for,
)

APP = "tandem-router"
CLUSTER_NAME = "router"
ENGINE = {
    "device": "cpu",
    "dtype": "float32",
    "block_size": 8,
    # 2048 tokens per worker: the workload's conversations end near 6,200 tokens in all,
    # so one decode worker holds about a third of them at their longest, the decode
    # pool all of them (CHAT below).
    "kv_cache_tokens": 2048,
    "max_num_seqs": 16,
    "max_num_batched_tokens": 128,
    "max_model_len": 512,
}
PREFIX_AWARE = {"prefill": "prefix_aware", "decode": "prefix_aware"}
ROUND_ROBIN = {"prefill": "round_robin", "decode": "round_robin"}
# The multi-turn workload of the hit-rate test: 16 conversations x 5 turns, no shared
# system prompt (a shared prefix is cached everywhere and hides where a conversation is),
# each turn the previous prompt + the generated answer + 24-56 new tokens.
CHAT = {"conversations": 16, "turns": 5, "system_tokens": 0}


# ------------------------------------------------------------ feeder over Redis


def _register(url: str, replica_id: str, ttl_s: float) -> WorkerRegistry:
    registry = WorkerRegistry(url, ttl_s=ttl_s, cluster=CLUSTER_NAME)
    registry.register(
        WorkerInfo(
            replica_id=replica_id,
            role="decode",
            model="tiny",
            capacity=WorkerCapacity(max_num_seqs=4, kv_blocks=(64, 32), block_size=4),
        )
    )
    return registry


def _feeder(url: str) -> PrefixIndexFeeder:
    return PrefixIndexFeeder(KVEventReader(url, cluster=CLUSTER_NAME), block_ms=100)


def test_feeder_builds_the_exact_index_and_a_late_reader_catches_up(redis_url):
    h = hash_prompt_blocks(list(range(40)), 4)  # 10 chained hashes
    w1, w2 = _register(redis_url, "w1", 30), _register(redis_url, "w2", 1.0)
    p1 = KVEventPublisher(redis_url, "w1", incarnation=w1.info.incarnation, cluster=CLUSTER_NAME)
    p2 = KVEventPublisher(redis_url, "w2", incarnation=w2.info.incarnation, cluster=CLUSTER_NAME)
    w1.start_heartbeats(0.2)
    w2.start_heartbeats(0.2)

    async def scenario() -> None:
        p1.publish(KVEvent.stored(FULL, x, None, 4) for x in h[:6])
        p1.publish([KVEvent.stored(SLIDING, h[5], None, 4), KVEvent.removed(FULL, h[2])])
        p2.publish(KVEvent.stored(FULL, x, None, 4) for x in h[:3])
        assert p1.flush() and p2.flush()
        live = _feeder(redis_url)
        await live.start()
        index = live.index
        assert index.blocks("w1") == {(FULL, x) for x in (h[0], h[1], h[3], h[4], h[5])} | {
            (SLIDING, h[5])
        }
        assert index.blocks("w2") == {(FULL, x) for x in h[:3]}
        assert index.cached_prompt_tokens(list(range(41)), ["w1", "w2"], 4) == {"w1": 8, "w2": 12}

        # Followed: events published after the start arrive without another catch-up.
        p1.publish([KVEvent.stored(FULL, h[2], h[1], 4)])
        await asyncio.to_thread(p1.flush)
        await asyncio.wait_for(_until(lambda: index.holds("w1", FULL, h[2])), 5)
        assert index.cached_prompt_tokens(list(range(41)), ["w1"], 4) == {"w1": 24}

        # A reader started now (a restarted ingress) replays the streams to the same view.
        late = _feeder(redis_url)
        await late.start()
        assert late.digest() == live.digest() and late.index.num_blocks() == 7 + 3

        # w2's heartbeat stops: once its record expires, both forget its blocks.
        await asyncio.to_thread(w2.stop_heartbeats)
        for feeder in (live, late):
            await asyncio.wait_for(_until(lambda f=feeder: f.index.num_blocks("w2") == 0), 10)
            assert feeder.index.num_blocks("w1") == 7 and feeder.resets >= 1
        assert late.digest() == live.digest()
        await live.close()
        await late.close()

    try:
        asyncio.run(scenario())
    finally:
        for closing in (p1.close, p2.close, w1.close, w2.close):
            closing()


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.02)


# ------------------------------------------------------------ config


def test_placement_config_is_validated_and_converted():
    settings, _ = parse_args(
        {
            "placement": {
                "prefill": "prefix_aware",
                "decode": "round_robin",
                "prefix_aware": {"decode": {"kv_weight": 0.2, "max_imbalance": 3}},
                "skip_prefill_cached_fraction": 0.5,
            }
        }
    )
    p = settings.placement
    assert (p.prefill, p.decode, p.skip_prefill_cached_fraction) == (
        "prefix_aware",
        "round_robin",
        0.5,
    )
    assert p.prefill_prefix_aware == PrefixAwareConfig()
    # A section given in part keeps the pool's own defaults for the rest.
    assert p.decode_prefix_aware == PrefixAwareConfig(kv_weight=0.2, max_imbalance=3)
    assert parse_args({})[0].placement.decode_prefix_aware.kv_weight == 0.05
    bad = [
        ({"prefix_aware": {"prefill": {"queued_weight": -1}}}, "prefill.queued_weight"),
        ({"prefix_aware": {"decode": {"max_imbalance": 1.5}}}, "decode.max_imbalance"),
        ({"prefix_aware": {"decode": {"kv_wieght": 1}}}, "decode.kv_wieght"),
        ({"skip_prefill_cached_fraction": 0}, "/skip_prefill_cached_fraction"),
        ({"skip_prefill_cached_fraction": 1.5}, "/skip_prefill_cached_fraction"),
        ({"decode": "cache_aware"}, "/decode"),
    ]
    for placement, where in bad:
        with pytest.raises(ConfigError) as err:
            parse_args({"placement": placement})
        # "/x": placement.x; "pool.x": placement.prefix_aware.pool.x.
        path = where[1:] if where.startswith("/") else f"prefix_aware.{where}"
        assert err.value.field == f"args.placement.{path}"
    # The shipped file loads, with every knob spelled out (the weights bench/router_sim.py
    # chose: no KV term, a request bound of 32, copies only onto short queues, both pools
    # alike).
    shipped = load_app_config().settings.placement
    want = PrefixAwareConfig(kv_weight=0.0, max_imbalance=32, copy_queue_ratio=1.0)
    assert shipped.decode_prefix_aware == want
    assert shipped.prefill_prefix_aware == want


def test_router_metrics_refuse_unknown_pools():
    with pytest.raises(ValueError, match="pool"):
        RouterMetrics("r").prefix_tokens("both", 10, 5, 5)


# ------------------------------------------------------------ the cluster


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    with serve_cluster(
        str(tiny_model_dir),
        app=APP,
        cluster_name=CLUSTER_NAME,
        engine=ENGINE,
        placement=PREFIX_AWARE,
        prefill=2,
        decode=3,
        ingress=2,
    ) as c:
        yield c


@pytest.fixture(scope="module")
def vocab(tiny_model_dir) -> int:
    return json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]


def _pool_sums(states: dict[str, dict]) -> dict[str, int]:
    """pool_tokens of every ingress replica, summed over replicas and pools."""
    sums: dict[str, int] = {}
    for state in states.values():
        for tokens in state["pool_tokens"].values():
            for key, value in tokens.items():
                sums[key] = sums.get(key, 0) + value
    return sums


def test_prefix_aware_reuse_against_the_oracle_and_round_robin(cluster, vocab, capsys):
    """A multi-turn chat workload through the two prefix-aware ingress replicas, then a
    fresh one of the same shape through a round-robin ingress over the same workers.

    Workload (CHAT, ENGINE): 16 conversations x 5 turns, no shared system prompt, each
    turn extending the previous prompt; they end near 430 tokens, 6,200 in all, and each
    worker caches 2048 tokens: about a third of the conversations at their longest, so
    the decode pool holds them all only if each stays on one replica. Prefix-aware keeps
    a conversation where its KV is; round-robin spreads it over every replica, and LRU
    evicts what the others' turns displace.

    Measured (2 shared cores, bench/RESULTS.md "Router"): prefix-aware 0.69-0.74, at
    0.96-1.0 of the oracle; round-robin 0.37-0.57: 1.3x-2.0x. With caches that hold
    everything (16k tokens per worker, a 32-token shared system prompt) the ratio is
    1.3x. The issue asks for 3x round-robin; LRU caches on 2 prefill + 3 decode replicas
    cannot show that: the replica that served a conversation's previous turn keeps it as
    long under round-robin as under prefix-aware (one round of the other conversations'
    turns in between either way), round-robin sends the next turn there one time in
    three (a third of prefix-aware's reuse), and half of the rest to the prefill replica
    that computed the previous prompt. Smaller caches lower both (1280 tokens:
    prefix-aware 0.50, below 0.9 of its oracle; round-robin 0.29). So what is checked is
    the oracle bound and a margin over round-robin that holds run after run.
    """
    pa = run_chat_workload(cluster.target, ChatWorkload(vocab, seed=1, **CHAT))
    states = cluster.router_states()
    assert len(states) == 2
    # Clients were spread over both ingress replicas; conversations moved between them.
    for state in states.values():
        assert sum(t["requests"] for t in state["pool_tokens"].values()) > 0
    sums = _pool_sums(states)
    prompt = sum(r.prompt_tokens for r in pa.results)
    assert sums["requests"] == len(pa.results) == 16 * 5
    # The ingress's per-pool accounting is the workers' own usage reports.
    assert sums["prompt_tokens"] == prompt
    assert sums["cached_tokens"] == sum(r.cached_tokens for r in pa.results)
    pa_rate = hit_rate(pa.results)
    oracle_rate = sums["oracle_tokens"] / prompt
    oracle_any_rate = sums["oracle_any_tokens"] / prompt

    rr_target = cluster.add_ingress_app("tandem-rr", ROUND_ROBIN)
    rr = run_chat_workload(rr_target, ChatWorkload(vocab, seed=2, **CHAT))
    rr_rate = hit_rate(rr.results)
    with capsys.disabled():
        print(
            f"\nprefix hit rate: prefix-aware {pa_rate:.3f} (oracle of the computing pool "
            f"{oracle_rate:.3f}, of any cache {oracle_any_rate:.3f}), round-robin "
            f"{rr_rate:.3f}; ratio {pa_rate / rr_rate:.2f}; decisions "
            f"{_decisions(states)}"
        )
    assert pa_rate >= 0.9 * oracle_rate
    # Not the 3x (see the docstring): measured 1.3x to 2.0x.
    assert pa_rate >= 1.2 * rr_rate


def _decisions(states: dict[str, dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for state in states.values():
        for key, n in state["decisions"].items():
            total[key] = total.get(key, 0) + n
    return dict(sorted(total.items()))


def _reference_digest(cluster) -> str:
    """The index a reader of our own builds from Redis, over the live workers."""

    async def build() -> str:
        feeder = _feeder(cluster.redis_url)
        await feeder.catch_up()
        workers = cluster.replicas("prefill") + cluster.replicas("decode")
        digest = feeder.digest(workers)
        await feeder.close()
        return digest

    return asyncio.run(build())


def _settled_digests(cluster) -> tuple[str, dict[str, dict]]:
    """Once idle: every ingress replica's index equals our own reader's (events take a
    flush interval to arrive); returns that digest and the replicas' states."""

    def agreed():
        want = _reference_digest(cluster)
        states = cluster.router_states()
        if states and all(s["index"]["digest"] == want for s in states.values()):
            return want, states
        return None

    return wait_for(agreed, 15, "every ingress index equal to the streams", interval_s=0.3)


def _probes(histories: dict[int, list[int]], seed: int) -> list[list[int]]:
    """Next turns of some conversations, and prompts no cache holds."""
    rng = random.Random(seed)
    probes = [h + [rng.randrange(500) for _ in range(40)] for _, h in sorted(histories.items())]
    probes += [[rng.randrange(500) for _ in range(n)] for n in (20, 90, 200)]
    return probes


def _explain(cluster, replica_id: str, probes: list[list[int]]) -> list[dict]:
    out = []
    for prompt in probes:
        got = cluster.ingress_call(replica_id, "explain_placement", json.dumps(prompt))
        assert got.pop("replica_id") == replica_id
        out.append(got)
    return out


@pytest.fixture(scope="module")
def conversations(cluster, vocab) -> dict[int, list[int]]:
    """A few short conversations, so the caches (and indexes) hold something."""
    workload = ChatWorkload(vocab, seed=3, conversations=4, turns=2, start_within_s=0.2)
    return run_chat_workload(cluster.target, workload, clients=4).histories


def test_ingress_replicas_build_the_same_index_and_choose_alike(cluster, conversations):
    digest, states = _settled_digests(cluster)
    assert len(states) == 2 and digest
    blocks = next(iter(states.values()))["index"]["blocks"]
    assert sum(blocks.values()) > 0
    a, b = sorted(states)
    probes = _probes(conversations, seed=4)
    choices = _explain(cluster, a, probes)
    assert choices == _explain(cluster, b, probes)
    # The continuations go where their conversation is cached.
    for choice in choices[: len(conversations)]:
        assert choice["decode_reason"] == "prefix" and choice["decode_cached_tokens"] > 0


def test_restarted_ingress_replicas_keep_the_index(cluster, conversations):
    """Kill both ingress replicas; Serve starts new ones, which rebuild the index from
    the streams before serving: same digest, same choices, and the next turn of a
    conversation is served from its cache."""
    digest, states = _settled_digests(cluster)
    probes = _probes(conversations, seed=5)
    before = _explain(cluster, sorted(states)[0], probes)
    old = set(states)
    for rid in old:
        actor = ray.get_actor(f"SERVE_REPLICA::{APP}#Ingress#{rid}", namespace="serve")
        ray.kill(actor, no_restart=True)

    def replaced() -> list[str] | None:
        new = [r for r in cluster.ingress_replicas() if r not in old]
        return new if len(new) == 2 else None

    new = wait_for(replaced, 60, "two new ingress replicas", interval_s=0.2)

    def first_state(rid: str) -> dict | None:
        try:
            state = cluster.ingress_call(rid, "router_state")
        except Exception:  # still starting: Serve does not route to it yet
            return None
        return state if state["replica_id"] == rid else None

    for rid in new:
        state = wait_for(lambda r=rid: first_state(r), 60, f"ingress {rid} serving", 0.2)
        # No waiting for events here: the index was whole when the replica came up.
        assert state["index"]["digest"] == digest
        assert state["index"]["applied"] > 0
        assert _explain(cluster, rid, probes) == before

    # Serving goes on through the new replicas, by the index they rebuilt.
    c, history = sorted(conversations.items())[0]
    prompt = history + [7] * 24
    with TandemClient(cluster.target) as client:
        wait_for(lambda: _healthy(client), 30, "gRPC served by the new replicas", 0.2)
        last = None
        for chunk in client.generate(
            prompt, timeout=STREAM_TIMEOUT_S, max_tokens=4, temperature=0.0, ignore_eos=True
        ):
            last = chunk
    assert last is not None
    assert last.usage.cached_tokens >= len(history) - 2 * ENGINE["block_size"], c
    assert last.served_by.prefill_replica == ""  # the conversation's decode worker held it


def _healthy(client) -> bool:
    try:
        client.health()
        return True
    except Exception:
        time.sleep(0.2)
        return False


def test_prompt_hashes_match_the_workers(cluster, conversations):
    """The blocks a conversation's decode worker reports are exactly the chained hashes
    the router computes for the conversation's tokens (same function, same block size)."""
    _, states = _settled_digests(cluster)
    history = sorted(conversations.items())[0][1]
    hashes = prompt_block_hashes(history, ENGINE["block_size"])

    async def holders() -> set[str]:
        feeder = _feeder(cluster.redis_url)
        await feeder.catch_up()
        found = {w for w in feeder.index.workers if feeder.index.holds(w, FULL, hashes[-2])}
        await feeder.close()
        return found

    assert asyncio.run(holders()) & set(cluster.replicas("decode"))


# ------------------------------------------------------------ the simulation is the code


def _router_sim():
    """bench/router_sim.py, loaded from its path (bench/ is not a package of tandem)."""
    path = Path(__file__).resolve().parent.parent / "bench" / "router_sim.py"
    spec = importlib.util.spec_from_file_location("router_sim_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _generate_admitted(client: TandemClient, prompt: list[int], max_tokens: int):
    """The answer's token ids and the last chunk; a request admission refuses (the shared box
    runs slowly) is sent again once its retry-after passed: refused requests are not
    placed (admission comes first), so the decision log holds the admitted ones only."""
    deadline = time.monotonic() + STREAM_TIMEOUT_S
    while True:
        try:
            last, answer = None, []
            for chunk in client.generate(
                prompt,
                timeout=STREAM_TIMEOUT_S,
                max_tokens=max_tokens,
                temperature=0.0,
                ignore_eos=True,
            ):
                answer += chunk.token_ids
                last = chunk
            return answer, last
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _run_sessions(target: str, sessions) -> list[tuple[str, str, str]]:
    """Each session on its own client (its own connection, so the kernel spreads them
    over the Ingress replicas sharing the port), its requests think_s apart, each turn's
    prompt extending the last one and the answer the cluster gave; returns (prompt
    digest, decode replica, prefill replica) as the workers reported them."""
    served: list[tuple[str, str, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def run(spec) -> None:
        try:
            with TandemClient(target, options=[("grpc.use_local_subchannel_pool", 1)]) as client:
                time.sleep(max(0.0, spec.start_s - (time.monotonic() - t0)))
                history: tuple[int, ...] = ()
                for k, step in enumerate(spec.steps):
                    time.sleep(step.think_s)
                    prompt = list(spec.prompt(k, history))
                    answer, last = _generate_admitted(client, prompt, step.output_tokens)
                    history = (*prompt, *answer)
                    by = last.served_by
                    row = (prompt_digest(prompt), by.decode_replica, by.prefill_replica)
                    with lock:
                        served.append(row)
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a session did not finish"
    return served


def test_cluster_decisions_are_the_simulations(cluster, vocab, capsys):
    """A short chat trace from cluster/workloads.py through two Ingress replicas running
    the shipped placement (deploy/serve-config.yaml), which log each decision with its
    inputs (the load view after the join of heartbeats and in-flight figures, the cached
    tokens per replica from the index and the pending prompts). Checked: every request
    was placed once and went where placement said; and the simulation's placement
    (bench/router_sim.py: make_ingress with the weights it reads from the same file),
    given each logged decision's inputs, makes the same decision, reasons and cached
    figures included. It fails if the ingress placed with other weights, another rule
    or another policy than the simulation models, or changed a decision after place()."""
    sim = _router_sim()
    app_args = yaml.safe_load(sim.SERVE_CONFIG.read_text())["applications"][0]["args"]
    shipped = app_args["placement"]
    assert (
        cluster.args["disagg"]["local_prefill_threshold"]
        == (app_args["disagg"]["local_prefill_threshold"])
    )
    target = cluster.add_ingress_app("tandem-shipped", shipped, replicas=2)
    # Conversations of 3-4 turns ending under 250 tokens (the tiny model's context is
    # 512): each turn extends the last, so its prefix is cached (or pending) where the
    # last one went. (Its sliding layers make the engine reuse a prefix only with the
    # window before the hit: a RAG question diverging after its document finds none.)
    workload = ChatSessions(
        vocab_size=vocab,
        seed=5,
        session_rate=4.0,
        system_tokens=16,
        turns=(3, 4),
        first_user_tokens=(24, 48),
        user_tokens=(8, 24),
        answer_tokens=(4, 8),
        think_s=(0.05, 0.3),
    )
    sessions = workload.sessions(2.0)
    assert len(sessions) >= 6
    served = _run_sessions(target, sessions)
    states = cluster.router_states(app="tandem-shipped")
    assert len(states) == 2
    logged = {rid: s["recent_decisions"] for rid, s in states.items()}
    # Both replicas placed requests; every request was placed exactly once.
    assert all(logged.values()), {rid: len(d) for rid, d in logged.items()}
    decisions = {e["prompt"]: e for entries in logged.values() for e in entries}
    assert len(decisions) == sum(map(len, logged.values())) == len(served)
    ingress = sim.make_ingress(sim.SimConfig(), sim.shipped_prefix_aware())
    reasons = Counter()
    for digest, decode, prefill in served:
        entry = decisions[digest]
        placed = entry["placement"]
        # The request ran where placement said (a decode worker may still prefill a
        # remote-placed prompt itself when its own cache holds enough of it).
        assert decode == placed["decode"]
        assert prefill in ({placed["prefill"], ""} if placed["prefill"] else {""})
        replayed = sim.replay_decision(ingress, entry)
        assert asdict(replayed) == placed, (digest, entry)
        reasons[placed["decode_reason"]] += 1
    # The trace reused prefixes: some decisions followed a cached (or pending) one.
    assert reasons["prefix"] > 0, reasons
    # The comparison sees a difference where there is one: the same inputs through a
    # placement that ignores caches (prompt_weight 0) decide some requests otherwise.
    blind = sim.make_ingress(sim.SimConfig(), replace(sim.shipped_prefix_aware(), prompt_weight=0))
    differ = sum(
        asdict(sim.replay_decision(blind, e)) != e["placement"] for e in decisions.values()
    )
    assert differ > 0
    with capsys.disabled():
        print(
            f"\nreplayed {len(decisions)} decisions of 2 ingress replicas "
            f"({[len(d) for d in logged.values()]}): all equal; reasons {dict(reasons)}; "
            f"{differ} differ with prompt_weight 0"
        )
