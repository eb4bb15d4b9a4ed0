"""Placement policies, the disaggregation decision and the load view, on constructed
states (no Ray, no Redis)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from tandem.router.load import InFlight, LoadView, ReplicaLoad
from tandem.router.policies import (
    Choice,
    DisaggRule,
    LeastLoaded,
    Placement,
    PoolRequest,
    PrefixAware,
    PrefixAwareConfig,
    RoundRobin,
    make_policy,
    place,
)
from tandem.router.prefix_index import (
    FULL,
    SLIDING,
    PrefixIndex,
    prompt_block_hashes,
    sliding_blocks,
)
from tandem.workers.control_plane import WorkerCapacity, WorkerInfo, WorkerLoad


def replica(rid: str, **load) -> ReplicaLoad:
    return ReplicaLoad(replica_id=rid, **{"max_num_seqs": 8, **load})


def worker(rid: str, role: str, max_num_seqs: int = 8, **load) -> WorkerInfo:
    return WorkerInfo(
        replica_id=rid,
        role=role,
        model="tiny",
        capacity=WorkerCapacity(max_num_seqs=max_num_seqs, kv_blocks=(64, 16), block_size=8),
        load=WorkerLoad(**load),
    )


def choose(policy, replicas, n=10, cached=None) -> str | None:
    choice = policy.choose(PoolRequest(tuple(replicas), n, cached or {}))
    return None if choice is None else choice.replica_id


# ------------------------------------------------------------------ least loaded


def test_least_loaded_takes_fewest_outstanding_requests():
    pool = [replica("a", running=3), replica("b", running=1, waiting=1), replica("c", running=4)]
    assert LeastLoaded().choose(PoolRequest(pool, 10)) == Choice("b", "least_loaded")


def test_least_loaded_counts_fresh_in_flight_over_stale_heartbeat():
    # The heartbeat of "a" predates 5 requests this ingress just sent it.
    pool = [replica("a", running=0, in_flight=5), replica("b", running=2)]
    assert choose(LeastLoaded(), pool) == "b"


def test_in_flight_and_heartbeat_are_not_added_up():
    # 3 running on "a" are this ingress's 3 in flight: outstanding 3, not 6 (so "a" wins
    # against 4 on "b"); adding them up would wrongly pick "b".
    a = replica("a", running=3, in_flight=3)
    b = replica("b", running=4)
    assert a.outstanding == 3
    assert choose(LeastLoaded(), [a, b]) == "a"
    # The same for prompt tokens: the heartbeat's queue already has this ingress's.
    c = replica("c", queued_prompt_tokens=300, in_flight_prompt_tokens=200)
    assert c.pending_prompt_tokens == 300


def test_least_loaded_normalises_by_capacity():
    # 4 of 16 slots is less loaded than 3 of 8.
    pool = [replica("a", running=3, max_num_seqs=8), replica("b", running=4, max_num_seqs=16)]
    assert choose(LeastLoaded(), pool) == "b"


def test_least_loaded_tie_breaks_pending_tokens_then_kv_then_id():
    pool = [
        replica("a", running=1, queued_prompt_tokens=500, kv_usage=0.1),
        replica("b", running=1, in_flight_prompt_tokens=100, kv_usage=0.9),
        replica("c", running=1, queued_prompt_tokens=100, kv_usage=0.5),
    ]
    assert choose(LeastLoaded(), pool) == "c"
    equal = [replica("m"), replica("q"), replica("z")]
    assert choose(LeastLoaded(), equal) == "m"


def test_least_loaded_ignores_caches():
    pool = [replica("a", running=1), replica("b")]
    assert choose(LeastLoaded(), pool, 100, {"a": 96}) == "b"


def test_empty_pool_gets_no_choice():
    for policy in (LeastLoaded(), RoundRobin(), PrefixAware()):
        assert policy.choose(PoolRequest((), 10)) is None


# ------------------------------------------------------------------ round robin


def test_round_robin_cycles_in_id_order():
    pool = [replica("a"), replica("b"), replica("c")]
    rr = RoundRobin()
    assert [choose(rr, pool) for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    assert rr.choose(PoolRequest(pool, 1)).reason == "round_robin"


def test_round_robin_ignores_load_caches_and_follows_membership():
    rr = RoundRobin()
    pool = [replica("a", running=50), replica("b")]
    assert [choose(rr, pool, 100, {"b": 96}) for _ in range(3)] == ["a", "b", "a"]
    # Turn 3 over a pool of three: the cursor keeps counting requests.
    bigger = [replica("a"), replica("b"), replica("c")]
    assert [choose(rr, bigger) for _ in range(3)] == ["a", "b", "c"]


# ------------------------------------------------------------------ prefix aware


def test_prefix_aware_takes_the_longest_cached_prefix_at_equal_load():
    pool = [replica("a"), replica("b"), replica("c")]
    got = PrefixAware().choose(PoolRequest(pool, 100, {"a": 32, "b": 64, "c": 0}))
    assert got == Choice("b", "prefix")


def test_prefix_aware_cost_adds_prompt_left_queue_and_kv():
    policy = PrefixAware(PrefixAwareConfig(prompt_weight=1.0, queued_weight=0.5, kv_weight=0.1))
    a = replica("a", queued_prompt_tokens=40, kv_usage=0.25, kv_capacity_tokens=1000)
    request = PoolRequest((a,), 100, {"a": 48})
    # (100 - 48) + 0.5 * 40 + 0.1 * 250
    assert policy.cost(request, a) == pytest.approx(52 + 20 + 25)


def test_prefix_aware_lets_load_outweigh_a_short_prefix():
    # "a" holds 16 of 100 tokens but has 500 prompt tokens queued: "b" computes 100 now.
    pool = [replica("a", queued_prompt_tokens=500), replica("b")]
    got = PrefixAware().choose(PoolRequest(pool, 100, {"a": 16}))
    assert got == Choice("b", "load")
    # With the queue ignored, the cache wins.
    no_queue = PrefixAware(PrefixAwareConfig(queued_weight=0.0))
    assert no_queue.choose(PoolRequest(pool, 100, {"a": 16})) == Choice("a", "prefix")


def test_prefix_aware_weighs_decode_kv_in_use():
    busy = replica("a", kv_usage=0.9, kv_capacity_tokens=4096)
    idle = replica("b", kv_usage=0.0, kv_capacity_tokens=4096)
    request = PoolRequest((busy, idle), 200, {"a": 64})
    # Without a KV weight the 64 cached tokens decide; with 0.05 per token in use,
    # 0.05 * 3686 = 184 > 64 and the idle replica is cheaper.
    assert PrefixAware().choose(request) == Choice("a", "prefix")
    weighted = PrefixAware(PrefixAwareConfig(kv_weight=0.05))
    assert weighted.choose(request) == Choice("b", "load")


def test_prefix_aware_without_any_prefix_is_load_based():
    pool = [replica("a", in_flight_prompt_tokens=64), replica("b", queued_prompt_tokens=10)]
    assert PrefixAware().choose(PoolRequest(pool, 50)) == Choice("b", "no_prefix")
    # Equal cost: fewer outstanding requests per slot, then the lower id.
    tied = [replica("a", running=2), replica("b", running=1), replica("c", running=1)]
    assert PrefixAware().choose(PoolRequest(tied, 50)) == Choice("b", "no_prefix")


def test_prefix_aware_imbalance_bound_excludes_the_busy_holder():
    policy = PrefixAware(PrefixAwareConfig(max_imbalance=2))
    at_bound = [replica("a", in_flight=3), replica("b", running=1)]
    # "a" is 2 above "b": still eligible, and its cache makes it cheapest.
    assert policy.choose(PoolRequest(at_bound, 100, {"a": 96})) == Choice("a", "prefix")
    past_bound = [replica("a", in_flight=4), replica("b", running=1)]
    got = policy.choose(PoolRequest(past_bound, 100, {"a": 96}))
    assert got == Choice("b", "imbalance_bound")
    assert [r.replica_id for r in policy.eligible(past_bound)] == ["b"]


def test_prefix_aware_config_validation():
    for bad in ({"prompt_weight": -1.0}, {"kv_weight": float("inf")}, {"max_imbalance": -1}):
        with pytest.raises(ValueError, match="PrefixAwareConfig"):
            PrefixAwareConfig(**bad)
    with pytest.raises(ValueError, match="max_imbalance"):
        PrefixAwareConfig(max_imbalance=1.5)


def test_make_policy_names():
    assert isinstance(make_policy("least_loaded"), LeastLoaded)
    assert isinstance(make_policy("round_robin"), RoundRobin)
    config = PrefixAwareConfig(kv_weight=0.2)
    policy = make_policy("prefix_aware", config)
    assert isinstance(policy, PrefixAware) and policy.config == config
    assert make_policy("prefix_aware").config == PrefixAwareConfig()
    with pytest.raises(ValueError, match="placement policy"):
        make_policy("random")


# ------------------------------------------------- a hot prefix: the imbalance bound


def _hot_prefix_run(
    max_imbalance: int,
    cache_spreads: bool,
    finish_rate: float,
    seed: int = 0,
    slot_bound: bool = True,
) -> tuple[list[str], int]:
    """300 requests sharing a 256-token system prompt, placed one by one over 4
    replicas, with completions at random. The prefix starts cached on "r0" only; with
    `cache_spreads` a replica caches it once it served it (as the engine does).
    Checks at every decision that the chosen replica was within the bound of the least
    busy one; returns the choices and the largest spread of outstanding requests seen."""
    block = 16
    rng = random.Random(seed)
    index = PrefixIndex()
    system = [rng.randrange(1000) for _ in range(256)]
    for h in prompt_block_hashes(system + [0], block):
        index.stored("r0", FULL, h)
    ids = ["r0", "r1", "r2", "r3"]
    policy = PrefixAware(PrefixAwareConfig(max_imbalance=max_imbalance, slot_bound=slot_bound))
    flight = InFlight()
    placed: list[str] = []
    spread = 0
    for _ in range(300):
        prompt = system + [rng.randrange(1000) for _ in range(rng.randint(8, 40))]
        counts = flight.counts()
        pool = tuple(replica(r, in_flight=counts.get(r, 0)) for r in ids)
        cached = index.cached_prompt_tokens(prompt, ids, block)
        choice = policy.choose(PoolRequest(pool, len(prompt), cached))
        outstanding = {r.replica_id: r.outstanding for r in pool}
        assert outstanding[choice.replica_id] <= min(outstanding.values()) + max_imbalance
        flight.start(choice.replica_id)
        placed.append(choice.replica_id)
        after = [flight.counts().get(r, 0) for r in ids]
        spread = max(spread, max(after) - min(after))
        if cache_spreads:
            for h in prompt_block_hashes(prompt, block):
                index.stored(choice.replica_id, FULL, h)
        for r in flight.counts():
            if rng.random() < finish_rate:
                flight.finish(r)
    return placed, spread


@pytest.mark.parametrize("bound", [0, 2, 5])
@pytest.mark.parametrize("cache_spreads", [False, True])
def test_hot_prefix_is_spread_within_the_imbalance_bound(bound, cache_spreads):
    placed, spread = _hot_prefix_run(bound, cache_spreads, finish_rate=0.0)
    # Requests only arrive: the spread never exceeds the bound plus the one just placed.
    assert spread <= bound + 1
    counts = {r: placed.count(r) for r in ("r0", "r1", "r2", "r3")}
    # And the cache is still used: the holder is never behind the others.
    assert counts["r0"] == max(counts.values())
    assert max(counts.values()) - min(counts.values()) <= bound + 1


@pytest.mark.parametrize("bound", [1, 3])
def test_hot_prefix_bound_holds_with_completions(bound):
    placed, _ = _hot_prefix_run(bound, cache_spreads=False, finish_rate=0.3, seed=5)
    # The prefix holder takes the most, but not all: the bound sent some elsewhere.
    share = placed.count("r0") / len(placed)
    assert max(placed.count(r) for r in ("r1", "r2", "r3")) < placed.count("r0")
    assert share < 1.0


def test_without_the_bound_a_hot_prefix_piles_onto_one_replica():
    """The same run with an unreachable bound and no slot rule: every request goes to the
    holder, which is what the bounds exist to prevent."""
    placed, spread = _hot_prefix_run(10_000, False, finish_rate=0.0, slot_bound=False)
    assert set(placed) == {"r0"} and spread == 300


def test_slot_bound_alone_caps_the_holder_at_its_slots():
    """An unreachable request bound, the slot rule on: the holder takes requests until its
    8 slots are full, then the others fill theirs (in turn: cost ties go to the less busy,
    then the lower id), and once every replica is full the cost decides again."""
    placed, _ = _hot_prefix_run(10_000, cache_spreads=False, finish_rate=0.0)
    assert placed[:8] == ["r0"] * 8
    assert placed[8:32] == ["r1", "r2", "r3"] * 8
    assert set(placed[32:]) == {"r0"}


# ------------------------------------------------- prefix aware over a real index


def test_prefix_aware_follows_a_conversation_through_the_index():
    """Turn 2 of a conversation goes where turn 1's blocks are, also when the window
    rule leaves another replica only the full-attention blocks."""
    block = 8
    rng = random.Random(1)
    turn1 = [rng.randrange(500) for _ in range(80)]
    turn2 = turn1 + [rng.randrange(500) for _ in range(40)]
    index = PrefixIndex()
    hashes = prompt_block_hashes(turn1 + [0], block)
    for h in hashes:
        index.stored("d1", FULL, h)
        index.stored("d1", SLIDING, h)
        index.stored("d0", FULL, h)  # its sliding blocks were released and reused
    window_blocks = sliding_blocks(16, block)  # the tiny model's window of 16: 2 blocks
    cached = index.cached_prompt_tokens(turn2, ["d0", "d1", "d2"], block, window_blocks)
    assert cached == {"d0": 0, "d1": 80, "d2": 0}
    pool = [replica("d0"), replica("d1"), replica("d2")]
    assert PrefixAware().choose(PoolRequest(pool, len(turn2), cached)) == Choice("d1", "prefix")
    assert index.cached_prompt_tokens(turn2, ["d0"], block) == {"d0": 80}
    assert sliding_blocks(None, block) == 0 and sliding_blocks(128, 16) == 8


# ------------------------------------------------------------------ place()


RULE = DisaggRule(local_prefill_threshold=32, skip_prefill_cached_fraction=0.8)


def view() -> LoadView:
    return LoadView(
        prefill=(replica("p0", queued_prompt_tokens=900, running=1), replica("p1")),
        decode=(replica("d0", running=2), replica("d1", running=5)),
    )


def _place(v, n, cached=None, decode=None, prefill=None, rule=RULE) -> Placement:
    return place(
        v,
        n,
        decode_policy=decode or LeastLoaded(),
        prefill_policy=prefill or LeastLoaded(),
        rule=rule,
        cached_tokens=cached,
    )


def test_place_long_uncached_prompt_goes_remote():
    got = _place(view(), 100)
    assert (got.decode, got.prefill) == ("d0", "p1")
    assert (got.decode_reason, got.prefill_reason, got.prefill_choice) == (
        "least_loaded",
        "remote",
        "least_loaded",
    )


def test_place_short_prompt_stays_on_the_decode_replica():
    for n in (1, 31):
        got = _place(view(), n)
        assert (got.decode, got.prefill, got.prefill_reason) == ("d0", None, "short_prompt")
    assert _place(view(), 32).prefill == "p1"


def test_place_skips_the_prefill_pool_when_the_decode_replica_holds_the_prompt():
    # 200 tokens, d0 holds 176: 24 left < 32.
    got = _place(view(), 200, {"d0": 176, "p1": 176})
    assert (got.prefill, got.prefill_reason) == (None, "short_uncached")
    # 400 tokens, d0 holds 320 (80%): 80 left is over the threshold, but most is there.
    got = _place(view(), 400, {"d0": 320})
    assert (got.prefill, got.prefill_reason) == (None, "mostly_cached")
    # 312 of 400 (78%) is not most: remote, and the placement says what each holds.
    got = _place(view(), 400, {"d0": 312, "d1": 392, "p0": 200, "p1": 96})
    assert (got.prefill, got.prefill_reason) == ("p1", "remote")
    assert (got.decode_cached_tokens, got.prefill_cached_tokens) == (312, 96)
    assert (got.best_decode_cached_tokens, got.best_prefill_cached_tokens) == (392, 200)
    # A fraction of 1.0 turns the "most" rule off.
    off = DisaggRule(32, 1.0)
    assert _place(view(), 400, {"d0": 392}, rule=off).prefill_reason == "short_uncached"
    assert _place(view(), 400, {"d0": 360}, rule=off).prefill_reason == "remote"


def test_place_with_prefix_aware_pools():
    """Each pool decides by its own caches: the decode replica holding the conversation,
    the prefill replica holding the prompt before the answer."""
    got = _place(
        view(),
        400,
        {"d1": 300, "p0": 200},
        decode=PrefixAware(PrefixAwareConfig(kv_weight=0.0)),
        prefill=PrefixAware(PrefixAwareConfig(queued_weight=0.0)),
    )
    assert (got.decode, got.decode_reason) == ("d1", "prefix")
    assert (got.prefill, got.prefill_reason, got.prefill_choice) == ("p0", "remote", "prefix")


def test_place_without_replicas():
    got = _place(LoadView(), 100, rule=DisaggRule(0))
    assert got == Placement(decode=None, prefill=None, prefill_reason="no_prefill_replica")
    only_decode = LoadView(decode=(replica("d0"),))
    got = _place(only_decode, 100)
    assert (got.decode, got.prefill, got.prefill_reason) == ("d0", None, "no_prefill_replica")


def test_place_never_pairs_a_worker_with_itself():
    both = LoadView(prefill=(replica("w0"),), decode=(replica("w0"),))
    got = _place(both, 100, rule=DisaggRule(0))
    assert (got.decode, got.prefill, got.prefill_reason) == ("w0", None, "same_replica")


def test_disagg_rule_validation():
    with pytest.raises(ValueError, match="local_prefill_threshold"):
        DisaggRule(-1)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="skip_prefill_cached_fraction"):
            DisaggRule(32, bad)
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        PoolRequest((), -1)


# ------------------------------------------------------------------ LoadView


def test_load_view_from_registry_records():
    workers = [
        worker("d1", "decode", running=2, kv_usage=0.5),
        worker("p0", "prefill", queued_prompt_tokens=40),
        worker("b0", "both", max_num_seqs=4, waiting=1),
        worker("d0", "decode"),
    ]
    v = LoadView.from_workers(workers, {"d1": 3, "gone": 7}, {"p0": 90})
    assert [r.replica_id for r in v.decode] == ["b0", "d0", "d1"]
    assert [r.replica_id for r in v.prefill] == ["b0", "p0"]
    d1 = v.decode[2]
    assert (d1.running, d1.kv_usage, d1.in_flight, d1.max_num_seqs) == (2, 0.5, 3, 8)
    # Full-attention group: 64 blocks of 8 tokens.
    assert d1.kv_capacity_tokens == 512 and d1.kv_tokens_in_use == 256
    p0 = v.prefill[1]
    assert (p0.queued_prompt_tokens, p0.in_flight_prompt_tokens, p0.pending_prompt_tokens) == (
        40,
        90,
        90,
    )
    assert v.pool("prefill")[0].waiting == 1 and v.pool("prefill")[0].max_num_seqs == 4
    assert v.replica_ids() == ["b0", "d0", "d1", "p0"]
    assert v.imbalance("decode") == 3 and v.imbalance("prefill") == 1
    assert LoadView().imbalance("decode") == 0
    with pytest.raises(ValueError, match="role"):
        v.pool("both")


def test_load_view_rejects_unsorted_or_duplicate_pools():
    with pytest.raises(ValueError, match="LoadView.decode"):
        LoadView(decode=(replica("b"), replica("a")))
    with pytest.raises(ValueError, match="LoadView.prefill"):
        LoadView(prefill=(replica("a"), replica("a")))


def test_replica_load_validation():
    for name in ("in_flight", "in_flight_prompt_tokens", "kv_capacity_tokens"):
        with pytest.raises(ValueError, match=name):
            ReplicaLoad("a", **{name: -1})
    with pytest.raises(ValueError, match="kv_usage"):
        ReplicaLoad("a", kv_usage=1.5)
    with pytest.raises(ValueError, match="max_num_seqs"):
        ReplicaLoad("a", max_num_seqs=0)


def test_in_flight_counts_and_prompt_tokens():
    f = InFlight()
    f.start("a", prompt_tokens=100)
    f.start("a")
    f.start("b", prompt_tokens=7)
    assert f.prompt_tokens() == {"a": 100, "b": 7}
    f.prefilled("a", 100)
    f.finish("a")
    assert f.counts() == {"a": 1, "b": 1} and f.total() == 2
    assert f.prompt_tokens() == {"b": 7}
    f.finish("a")
    f.prefilled("b", 7)
    f.finish("b")
    assert f.counts() == {} and f.total() == 0 and f.prompt_tokens() == {}
    with pytest.raises(ValueError, match="without a matching start"):
        f.finish("a")
    with pytest.raises(ValueError, match="prompt tokens were started"):
        f.prefilled("a", 1)
    with pytest.raises(ValueError, match="prompt_tokens"):
        f.start("a", prompt_tokens=-1)


def test_router_imports_neither_torch_nor_ray():
    code = (
        "import sys, tandem.router.load, tandem.router.policies, tandem.router.prefix_index; "
        "bad = {'torch', 'ray', 'redis'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cached_prompt_tokens_hashes_lazily_and_agrees_with_full_hashing(monkeypatch):
    """The lookup the ingress runs per request: equal to matching the full hash list,
    and hashing no block past the longest cached prefix (+1 to see the miss)."""
    import tandem.router.prefix_index as prefix_index

    block = 4
    rng = random.Random(7)
    stems = [[rng.randrange(30) for _ in range(48)] for _ in range(3)]
    index = PrefixIndex()
    for w in ("a", "b", "c"):
        for stem in rng.sample(stems, 2):
            hashes = prompt_block_hashes(stem[: rng.randint(4, 48)], block)
            for h in hashes:
                index.stored(w, FULL, h)
            for h in hashes[-3:]:
                index.stored(w, SLIDING, h)
    calls = []
    real = prefix_index.iter_block_hashes

    def counted(*args, **kwargs):
        for h in real(*args, **kwargs):
            calls.append(1)
            yield h

    monkeypatch.setattr(prefix_index, "iter_block_hashes", counted)
    for _ in range(50):
        prompt = rng.choice(stems)[: rng.randint(1, 48)] + [rng.randrange(30) for _ in range(9)]
        for window_blocks in (0, 2):
            calls.clear()
            got = index.cached_prompt_tokens(prompt, ["a", "b", "c"], block, window_blocks)
            lazy_calls = len(calls)
            full = index.matched_blocks(
                prompt_block_hashes(prompt, block), ["a", "b", "c"], window_blocks
            )
            assert got == {w: n * block for w, n in full.items()}
            full_match = index.matched_blocks(prompt_block_hashes(prompt, block), ["a", "b", "c"])
            assert lazy_calls <= max(full_match.values()) + 1


def _prefix_aware_by_definition(config: PrefixAwareConfig, request: PoolRequest) -> Choice | None:
    """PrefixAware's documented rule written out plainly: the eligible replicas, the
    cheapest of them by (cost, outstanding per slot, id), and the reason from the pool's
    and the eligible replicas' longest prefixes."""
    pool = list(request.replicas)
    if not pool:
        return None

    def outstanding(r: ReplicaLoad) -> int:
        return max(r.running + r.waiting, r.in_flight)

    def held(r: ReplicaLoad) -> int:
        return request.cached_tokens.get(r.replica_id, 0)

    least = min(outstanding(r) for r in pool)
    eligible = [r for r in pool if outstanding(r) <= least + config.max_imbalance]
    free_slot = [r for r in eligible if outstanding(r) < r.max_num_seqs]
    if config.slot_bound and free_slot:
        eligible = free_slot

    def pending(r: ReplicaLoad) -> int:
        return max(r.queued_prompt_tokens, r.in_flight_prompt_tokens)

    most = max(held(r) for r in eligible)
    candidates = eligible
    if config.copy_queue_ratio is not None:
        ratio = config.copy_queue_ratio
        candidates = [
            r for r in eligible if held(r) == most or pending(r) <= ratio * (most - held(r))
        ]

    def key(r: ReplicaLoad) -> tuple:
        cost = (
            config.prompt_weight * max(0, request.num_prompt_tokens - held(r))
            + config.queued_weight * max(r.queued_prompt_tokens, r.in_flight_prompt_tokens)
            + config.kv_weight * r.kv_usage * r.kv_capacity_tokens
        )
        return (cost, outstanding(r) / r.max_num_seqs, r.replica_id)

    best = sorted(candidates, key=key)[0]
    longest = max(held(r) for r in pool)
    if longest == 0:
        reason = "no_prefix"
    elif held(best) == longest:
        reason = "prefix"
    elif max(held(r) for r in eligible) < longest:
        reason = "imbalance_bound"
    else:
        reason = "load"
    return Choice(best.replica_id, reason)


def test_prefix_aware_equals_its_definition_on_random_pools():
    """The one-pass choose() against the rule written out, on random pools with ties in
    cost, busy holders past the bound, and repeated choices on the same (memoised) entries."""
    rng = random.Random(7)
    for _ in range(400):
        pool = tuple(
            replica(
                f"r{i}",
                max_num_seqs=rng.choice([3, 4, 8]),
                running=rng.randrange(4),
                waiting=rng.randrange(3),
                in_flight=rng.randrange(6),
                queued_prompt_tokens=rng.choice([0, 0, 16, 64]),
                in_flight_prompt_tokens=rng.choice([0, 32]),
                kv_usage=rng.choice([0.0, 0.25, 0.5]),
                kv_capacity_tokens=rng.choice([0, 256]),
            )
            for i in range(rng.randint(1, 6))
        )
        cached = {r.replica_id: rng.choice([0, 0, 16, 32, 48]) for r in pool if rng.random() < 0.7}
        config = PrefixAwareConfig(
            queued_weight=rng.choice([0.0, 1.0]),
            kv_weight=rng.choice([0.0, 0.05]),
            max_imbalance=rng.randrange(4),
            slot_bound=rng.random() < 0.5,
            copy_queue_ratio=rng.choice([None, 0.0, 0.5, 1.0, 4.0]),
        )
        request = PoolRequest(pool, rng.choice([10, 40, 100]), cached)
        policy = PrefixAware(config)
        want = _prefix_aware_by_definition(config, request)
        assert policy.choose(request) == want
        assert policy.choose(request) == want
        assert request.best_cached() == max(cached.get(r.replica_id, 0) for r in pool)
    assert PrefixAware().choose(PoolRequest((), 10)) is None


def test_prefix_aware_slot_bound_skips_a_holder_with_full_slots():
    # a holds the whole prefix but its 8 slots are taken; b has room. The imbalance bound
    # alone (64) would keep a eligible.
    pool = [replica("a", running=8), replica("b", running=2)]
    config = PrefixAwareConfig(max_imbalance=64)
    assert PrefixAware(config).choose(PoolRequest(tuple(pool), 100, {"a": 96})) == Choice(
        "b", "imbalance_bound"
    )
    off = PrefixAwareConfig(max_imbalance=64, slot_bound=False)
    assert PrefixAware(off).choose(PoolRequest(tuple(pool), 100, {"a": 96})) == Choice(
        "a", "prefix"
    )
    # Every replica full: the rule steps aside and the cost decides.
    full = [replica("a", running=8), replica("b", running=9)]
    assert PrefixAware(config).choose(PoolRequest(tuple(full), 100, {"a": 96})) == Choice(
        "a", "prefix"
    )
    with pytest.raises(ValueError, match="slot_bound"):
        PrefixAwareConfig(slot_bound=1)


def test_prefix_aware_prompt_weight_keeps_a_conversation_over_a_short_queue():
    # a holds 900 of 1000 prompt tokens and has 1000 queued; b holds nothing, queue empty.
    # Equal weights move the request to b (100 + 1000 > 1000: a fresh replica looks
    # cheaper for this request); with prompt_weight 2 recomputing 1000 tokens costs the
    # pool 2000 and the request stays where its prefix is (200 + 1000 < 2000).
    pool = (replica("a", queued_prompt_tokens=1000), replica("b"))
    request = PoolRequest(pool, 1000, {"a": 900})
    assert PrefixAware(PrefixAwareConfig(max_imbalance=64)).choose(request) == Choice("b", "load")
    shipped = PrefixAwareConfig(prompt_weight=2.0, max_imbalance=64)
    assert PrefixAware(shipped).choose(request) == Choice("a", "prefix")


def test_prefix_aware_copies_a_cached_prefix_only_onto_a_replica_that_would_start_it():
    # a holds 900 of 1000 prompt tokens behind a 3000-token queue; b and c hold nothing,
    # with 1000 and 950 tokens queued. By cost alone c (1000 + 950) beats a (100 + 3000);
    # with the copy rule (ratio 1: at most 900 queued for the 900 tokens a copy
    # recomputes) neither b nor c may take a copy and the request stays on a.
    pool = (
        replica("a", queued_prompt_tokens=3000),
        replica("b", queued_prompt_tokens=1000),
        replica("c", queued_prompt_tokens=950),
    )
    request = PoolRequest(pool, 1000, {"a": 900})
    cost_only = PrefixAwareConfig(max_imbalance=64)
    assert PrefixAware(cost_only).choose(request) == Choice("c", "load")
    rule = PrefixAwareConfig(max_imbalance=64, copy_queue_ratio=1.0)
    assert PrefixAware(rule).choose(request) == Choice("a", "prefix")
    # Once c's queue is short enough to start the copy about at once, it takes it.
    idle = (pool[0], pool[1], replica("c", queued_prompt_tokens=200))
    assert PrefixAware(rule).choose(PoolRequest(idle, 1000, {"a": 900})) == Choice("c", "load")
    # Cold prompts (held nowhere) are placed by load alone.
    assert PrefixAware(rule).choose(PoolRequest(pool, 1000, {})) == Choice("c", "no_prefix")
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="copy_queue_ratio"):
            PrefixAwareConfig(copy_queue_ratio=bad)
