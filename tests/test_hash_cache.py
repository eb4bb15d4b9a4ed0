"""The ingress's cache of prompts' hash chains: reuse only for equal tokens, hashes equal
to hashing from scratch, lazy, bounded (exact eviction order), and placement unchanged."""

from __future__ import annotations

import random

import pytest

import tandem.router.hash_cache as hash_cache_module
from tandem.cluster.index_feeder import PrefixIndexFeeder
from tandem.cluster.placement import IngressPlacement, PlacementConfig
from tandem.router.hash_cache import HASH_BYTES, TOKEN_BYTES, HashCacheConfig, PromptHashCache
from tandem.router.policies import DisaggRule, PrefixAware, PrefixAwareConfig
from tandem.router.prefix_index import (
    FULL,
    SLIDING,
    PrefixIndex,
    prompt_block_hashes,
    usable_blocks,
)
from tandem.workers.control_plane import (
    KVEvent,
    KVEventEntry,
    KVEventReader,
    WorkerCapacity,
    WorkerInfo,
    WorkerLoad,
)
from tandem.workers.kv.block_hash import hash_prompt_blocks

BS = 4


def _lookup(cache: PromptHashCache, prompt: list[int], num_blocks: int | None = None):
    """Look up, hash the whole chain, remember it; returns (hashes, blocks reused)."""
    chain = cache.chain(prompt, len(prompt) // BS if num_blocks is None else num_blocks)
    hashes = list(chain)
    cache.remember(chain)
    cache.check_integrity()
    return hashes, len(chain.cached)


def test_a_turn_reuses_the_previous_turns_chain_and_hashes_only_its_new_blocks():
    cache = PromptHashCache(BS)
    turn1 = list(range(100, 122))  # 5 full blocks + 2 tokens
    hashes, reused = _lookup(cache, turn1)
    assert hashes == hash_prompt_blocks(turn1, BS) and reused == 0
    turn2 = turn1 + [7, 8, 9, 10, 11, 12]  # the partial block completes, one more after it
    hashes, reused = _lookup(cache, turn2)
    assert hashes == hash_prompt_blocks(turn2, BS) and reused == 5
    assert (cache.num_prompts, cache.num_blocks) == (1, 7)  # the leaf grew in place
    assert cache.num_bytes == 7 * (BS * TOKEN_BYTES + HASH_BYTES)
    turn3 = turn2 + list(range(40))
    hashes, reused = _lookup(cache, turn3)
    assert hashes == hash_prompt_blocks(turn3, BS) and reused == 7
    assert (cache.lookups, cache.hits, cache.reused_blocks) == (3, 2, 12)


def test_reuse_is_by_token_equality_at_block_granularity():
    cache = PromptHashCache(BS)
    base = list(range(1000, 1024))  # 6 blocks
    _lookup(cache, base)
    # Diverging mid-block 3 (token 14): blocks 0-2 reused, block 3 on is hashed.
    diverged = base[:14] + [5, 5, 5, 5, 5, 5, 5, 5]
    hashes, reused = _lookup(cache, diverged)
    assert hashes == hash_prompt_blocks(diverged, BS) and reused == 3
    # Same first block, different from block 1 on: only block 0.
    other = base[:4] + [9] * 16
    hashes, reused = _lookup(cache, other)
    assert hashes == hash_prompt_blocks(other, BS) and reused == 1
    # A different first block: nothing, though every later block equals base's.
    shifted = [0, 1, 2, 3] + base[4:]
    hashes, reused = _lookup(cache, shifted)
    assert hashes == hash_prompt_blocks(shifted, BS) and reused == 0
    # The tree keeps all of them, split where they diverge.
    for prompt in (base, diverged, other, shifted):
        chain = cache.chain(prompt, len(prompt) // BS)
        assert len(chain.cached) == len(prompt) // BS and list(chain) == chain.cached
    assert cache.num_prompts == 4
    # A prompt shorter than a cached one takes only its own (limited) blocks.
    hashes, reused = _lookup(cache, base[:10], num_blocks=2)
    assert hashes == hash_prompt_blocks(base, BS)[:2] and reused == 2


def test_random_multi_turn_chains_equal_hashing_from_scratch():
    rng = random.Random(3)
    cache = PromptHashCache(BS, HashCacheConfig(max_prompts=6, max_bytes=3000))
    conversations = [[rng.randrange(5) for _ in range(rng.randint(1, 12))] for _ in range(10)]
    for _ in range(400):
        i = rng.randrange(len(conversations))
        prompt = conversations[i]
        roll = rng.random()
        if roll < 0.6:
            prompt = conversations[i] = prompt + [
                rng.randrange(5) for _ in range(rng.randint(1, 9))
            ]
        elif roll < 0.8:
            cut = rng.randrange(len(prompt) + 1)
            prompt = prompt[:cut] + [rng.randrange(5) for _ in range(rng.randint(0, 9))]
        if len(prompt) > 150:
            conversations[i] = prompt = prompt[:8]
        num_blocks = rng.choice((len(prompt) // BS, rng.randint(0, len(prompt) // BS + 2)))
        chain = cache.chain(prompt, num_blocks)
        stop = rng.randint(0, num_blocks + 1)  # a lookup that ends early, or not
        taken = [h for _, h in zip(range(stop), chain, strict=False)]
        full = hash_prompt_blocks(prompt, BS)[:num_blocks]
        assert taken == full[: len(taken)]
        assert chain.hashes == full[: len(chain.hashes)]
        cache.remember(chain)
        cache.check_integrity()
        assert cache.num_prompts <= 6 and cache.num_bytes <= 3000
    assert cache.evicted_prompts > 0 and cache.reused_blocks > 0


def _count_hashing(monkeypatch) -> list:
    """The hashes the cache computes from now on, appended as they are yielded."""
    computed = []
    real = hash_cache_module.iter_encoded_block_hashes

    def counted(*args, **kwargs):
        for h in real(*args, **kwargs):
            computed.append(h)
            yield h

    monkeypatch.setattr(hash_cache_module, "iter_encoded_block_hashes", counted)
    return computed


def test_a_chain_is_hashed_only_as_far_as_it_is_iterated(monkeypatch):
    computed = _count_hashing(monkeypatch)
    cache = PromptHashCache(BS)
    prompt = list(range(200, 240))  # 10 blocks
    chain = cache.chain(prompt, 10)
    it = iter(chain)
    assert [next(it) for _ in range(3)] == hash_prompt_blocks(prompt, BS)[:3]
    assert len(computed) == 3
    cache.remember(chain)  # keeps the 3 it has
    assert cache.num_blocks == 3
    computed.clear()
    chain = cache.chain(prompt, 10)
    assert list(chain) == hash_prompt_blocks(prompt, BS) and len(computed) == 7
    cache.remember(chain)
    assert cache.num_blocks == 10 and cache.num_prompts == 1


def test_eviction_drops_the_least_recently_used_prompt():
    cache = PromptHashCache(BS, HashCacheConfig(max_prompts=2))
    a, b, c = ([k] * 8 for k in (1, 2, 3))
    _lookup(cache, a)
    _lookup(cache, b)
    _lookup(cache, a)  # a is now the more recent
    _lookup(cache, c)  # evicts b
    assert cache.evicted_prompts == 1
    assert len(cache.chain(a, 2).cached) == 2 and len(cache.chain(b, 2).cached) == 0
    # The lookup of b just now found nothing and refreshed nothing; a was refreshed last,
    # so the next prompt evicts c.
    _lookup(cache, [4] * 8)
    assert len(cache.chain(c, 2).cached) == 0 and len(cache.chain(a, 2).cached) == 2
    cache.clear()
    cache.check_integrity()
    assert cache.num_prompts == 0 and len(cache.chain(a, 2).cached) == 0


def test_evicting_a_branch_merges_its_sibling_and_keeps_the_byte_bound():
    block_bytes = BS * TOKEN_BYTES + HASH_BYTES
    cache = PromptHashCache(BS, HashCacheConfig(max_bytes=9 * block_bytes))
    stem = [7] * 12  # 3 blocks
    _lookup(cache, stem + [1] * 8)  # 5 blocks
    _lookup(cache, stem + [2] * 8)  # splits after the stem: 3 + 2 + 2 blocks
    assert (cache.num_prompts, cache.num_blocks) == (2, 7)
    _lookup(cache, stem + [2] * 8)  # refresh the second branch
    _lookup(cache, [9] * 12)  # 10 blocks > 9: the first branch goes, the stem merges
    assert (cache.num_prompts, cache.num_blocks, cache.num_bytes) == (2, 8, 8 * block_bytes)
    assert len(cache.chain(stem + [2] * 8, 5).cached) == 5
    assert len(cache.chain(stem + [1] * 8, 5).cached) == 3
    # A prompt larger than the whole bound is not kept, and takes nothing else with it
    # beyond what must go.
    _lookup(cache, [3] * 44)
    assert cache.num_bytes <= 9 * block_bytes
    assert len(cache.chain([3] * 44, 11).cached) == 0


def test_remember_after_the_tree_changed_finds_its_place_again():
    cache = PromptHashCache(BS)
    first = cache.chain([1] * 12, 3)
    second = cache.chain([1] * 8 + [2] * 4, 3)
    assert list(first) == hash_prompt_blocks([1] * 12, BS)
    list(second)
    cache.remember(first)
    cache.remember(second)  # looked up before `first` was kept
    cache.check_integrity()
    assert cache.num_prompts == 2 and cache.num_blocks == 4
    assert len(cache.chain([1] * 8 + [2] * 4, 3).cached) == 3


def test_config_and_arguments_are_checked():
    for kwargs in ({"max_prompts": 0}, {"max_bytes": 0}, {"max_prompts": True}):
        with pytest.raises(ValueError, match="HashCacheConfig"):
            HashCacheConfig(**kwargs)
    with pytest.raises(ValueError, match="block_size"):
        PromptHashCache(0)
    with pytest.raises(ValueError, match="token_ids"):
        list(PromptHashCache(BS).chain([1, 2, 3, -1], 1))
    with pytest.raises(ValueError, match="block_size"):
        PrefixIndex().cached_prompt_tokens([1] * 20, ["w"], 8, hash_cache=PromptHashCache(BS))


# ------------------------------------------------------------------ placement


def _workers(rng: random.Random) -> list[WorkerInfo]:
    return [
        WorkerInfo(
            replica_id=f"{role[0]}{i}",
            role=role,
            model="m",
            capacity=WorkerCapacity(max_num_seqs=8, kv_blocks=(512, 64), block_size=BS),
            load=WorkerLoad(running=rng.randrange(4), queued_prompt_tokens=rng.randrange(64)),
        )
        for i, role in enumerate(("prefill", "prefill", "decode", "decode", "decode"))
    ]


def _stored(worker: str, group: str, h: bytes) -> KVEventEntry:
    return KVEventEntry(worker, "", KVEvent.stored(group, h, None, BS))


def _removed(worker: str, group: str, h: bytes) -> KVEventEntry:
    return KVEventEntry(worker, "", KVEvent.removed(group, h))


def test_placement_is_the_same_with_and_without_the_cache(monkeypatch):
    """A random multi-turn workload placed by two ingresses over one index, one with a
    (small, evicting) hash cache: the same placements every time, and the cached one
    hashes no block it held and none past the longest cached prefix + 1."""
    rng = random.Random(11)
    window = 9  # 2 sliding blocks before a hit
    feeder = PrefixIndexFeeder(KVEventReader("redis://127.0.0.1:1", cluster="test"))

    def ingress(hash_cache: HashCacheConfig | None) -> IngressPlacement:
        return IngressPlacement(
            decode_policy=PrefixAware(PrefixAwareConfig(kv_weight=0.05)),
            prefill_policy=PrefixAware(),
            config=PlacementConfig(
                rule=DisaggRule(local_prefill_threshold=12),
                block_size=BS,
                sliding_window=window,
                hash_cache=hash_cache,
                # Pending prefixes hash every block of a placed prompt (to register it):
                # what is checked here is the lookup's laziness.
                pending_prefixes=False,
            ),
            index=feeder,
        )

    plain = ingress(None)
    cached = ingress(HashCacheConfig(max_prompts=8))
    assert plain.hash_cache is None and cached.hash_cache is not None
    computed = _count_hashing(monkeypatch)
    system = [rng.randrange(50) for _ in range(10)]  # 2.5 blocks shared by most prompts
    conversations = [
        system + [rng.randrange(50) for _ in range(rng.randint(1, 20))] for _ in range(12)
    ]
    ids = [w.replica_id for w in _workers(rng)]
    for step in range(300):
        workers = _workers(rng)
        i = rng.randrange(len(conversations))
        prompt = conversations[i]
        roll = rng.random()
        if roll < 0.6:  # the next turn
            prompt = conversations[i] = prompt + [
                rng.randrange(50) for _ in range(rng.randint(1, 14))
            ]
        elif roll < 0.75:  # a retry diverging mid-block
            cut = rng.randrange(len(prompt))
            prompt = prompt[:cut] + [50 + rng.randrange(50) for _ in range(rng.randint(1, 6))]
        elif roll < 0.85:  # the same first block, different later
            prompt = prompt[:BS] + [rng.randrange(50) for _ in range(rng.randint(1, 30))]
        if len(prompt) > 120:
            conversations[i] = prompt = system + prompt[-5:]
        computed.clear()
        reused_before = cached.hash_cache.reused_blocks
        want = plain.place(prompt, workers)
        got = cached.place(prompt, workers)
        assert got == want, step
        longest = max(feeder.index.matched_blocks(prompt_block_hashes(prompt, BS), ids).values())
        reused = cached.hash_cache.reused_blocks - reused_before
        # Hashed: none the cache held, none past the longest cached prefix + 1.
        assert len(computed) <= max(0, min(longest + 1, usable_blocks(len(prompt), BS)) - reused)
        cached.hash_cache.check_integrity()
        # The replicas that served it now cache the prompt (full group: every block,
        # sliding: the last window), and now and then one loses blocks or everything.
        hashes = prompt_block_hashes(prompt + [0], BS)
        for w in {want.decode, want.prefill} - {None}:
            feeder.apply([_stored(w, FULL, h) for h in hashes])
            feeder.apply([_stored(w, SLIDING, h) for h in hashes[-3:]])
        if rng.random() < 0.1:
            w = rng.choice(ids)
            feeder.apply(
                _removed(w, g, h)
                for g, h in rng.sample(
                    sorted(feeder.index.blocks(w)), min(5, feeder.index.num_blocks(w))
                )
            )
        if rng.random() < 0.03:
            feeder.index.reset(rng.choice(ids))
    state = cached.state()["hash_cache"]
    assert state["reused_blocks"] > 0 and state["evicted_prompts"] > 0 and state["prompts"] <= 8
    assert "hash_cache" not in plain.state()
