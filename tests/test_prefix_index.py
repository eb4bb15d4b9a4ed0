"""The router's prefix index: exact contents after event sequences, and agreement with
the engine's own prefix lookup when fed the engine's real block events."""

from __future__ import annotations

import random

import pytest

from tandem.router.prefix_index import (
    FULL,
    SLIDING,
    PendingPrefixes,
    PrefixIndex,
    prompt_block_hashes,
)
from tandem.workers.engine.request import Request
from tandem.workers.engine.scheduler import Scheduler, SchedulerConfig
from tandem.workers.kv.block_hash import hash_prompt_blocks
from tandem.workers.kv.block_pool import BlockRemoved, BlockStored
from tandem.workers.kv.cache_manager import KVCacheManager, KVGroup

H = [bytes([i]) * 16 for i in range(10)]


def test_index_after_events_is_exact():
    index = PrefixIndex()
    index.stored("a", FULL, H[0])
    index.stored("a", FULL, H[1])
    index.stored("b", FULL, H[0])
    index.stored("a", SLIDING, H[1])
    index.removed("a", FULL, H[0])
    index.removed("c", FULL, H[5])  # unknown worker or block: nothing happens
    assert index.holds("b", FULL, H[0]) and not index.holds("a", FULL, H[0])
    assert index.holds("a", FULL, H[1]) and index.holds("a", SLIDING, H[1])
    assert index.num_blocks("a") == 2 and index.num_blocks("b") == 1 and index.num_blocks() == 3
    index.reset("a")
    assert index.num_blocks("a") == 0 and index.workers == frozenset({"b"})
    assert index.holds("b", FULL, H[0])


def test_matching_follows_the_chain_and_the_window():
    index = PrefixIndex()
    for h in H[:5]:
        index.stored("a", FULL, h)
    for h in H[3:5]:
        index.stored("a", SLIDING, h)
    for h in H[:3]:
        index.stored("b", FULL, h)
    index.stored("c", FULL, H[1])  # holds a block, but not the chain's first
    hashes = H[:6]
    assert index.matched_blocks(hashes, ["a", "b", "c", "d"]) == {"a": 5, "b": 3, "c": 0, "d": 0}
    # With sliding layers needing 2 blocks before the hit: a keeps 5, b has no window.
    assert index.matched_blocks(hashes, ["a", "b"], sliding_blocks=2) == {"a": 5, "b": 0}
    index.removed("a", SLIDING, H[4])
    # The window before 5 is broken; before 4 it needs blocks 2 and 3: 2 is missing.
    assert index.matched_blocks(hashes, ["a"], sliding_blocks=2) == {"a": 0}


def test_prompt_hashes_never_cover_the_whole_prompt():
    tokens = list(range(32))
    assert prompt_block_hashes(tokens, 8) == hash_prompt_blocks(tokens, 8)[:3]
    assert prompt_block_hashes(tokens + [7], 8) == hash_prompt_blocks(tokens, 8)[:4]
    assert prompt_block_hashes(tokens[:8], 8) == []


def _feed(index: PrefixIndex, worker: str, kv: KVCacheManager) -> None:
    for ev in kv.drain_events():
        if isinstance(ev, BlockStored):
            index.stored(worker, ev.group, ev.block_hash)
        elif isinstance(ev, BlockRemoved):
            index.removed(worker, ev.group, ev.block_hash)


def test_index_agrees_with_the_engine_lookup_under_churn():
    block, window = 4, 10
    rng = random.Random(3)
    kv = KVCacheManager([KVGroup(FULL, None), KVGroup(SLIDING, window)], block, [40, 24])
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=24, block_size=block), kv
    )
    index = PrefixIndex()
    stems = [[rng.randrange(50) for _ in range(24)] for _ in range(4)]
    checked = 0
    for step in range(300):
        if rng.random() < 0.3 and scheduler.num_waiting < 3:
            stem = rng.choice(stems)
            prompt = stem[: rng.randint(1, 24)] + [
                rng.randrange(50) for _ in range(rng.randint(0, 9))
            ]
            scheduler.add(Request(f"r{step}", prompt, max_tokens=rng.randint(1, 12)))
        out = scheduler.schedule()
        scheduler.update_after_step(
            out, {s.request_id: rng.randrange(50) for s in out.scheduled if s.needs_sample}
        )
        if rng.random() < 0.05 and scheduler.running:
            scheduler.abort(rng.choice(scheduler.running).request_id)
        _feed(index, "w", kv)
        probe = rng.choice(stems)[: rng.randint(2, 24)] + [rng.randrange(50)]
        expected = kv.find_cached_prefix(Request("probe", probe, max_tokens=1))
        got = index.matched_blocks(
            prompt_block_hashes(probe, block), ["w"], sliding_blocks=-(-(window - 1) // block)
        )["w"]
        assert got * block == expected, step
        checked += expected > 0
    assert checked > 20  # the probes did exercise real hits
    # A reader that lost the stream rebuilds the same view from the worker's snapshot.
    rebuilt = PrefixIndex()
    for ev in kv.snapshot():
        rebuilt.stored("w", ev.group, ev.block_hash)
    assert rebuilt.workers == index.workers == {"w"}
    assert rebuilt.blocks("w") == index.blocks("w")


def _reference_match(
    held: dict[tuple[str, str], set[bytes]], worker: str, hashes: list[bytes], need: int
) -> int:
    """The rule of the module docstring, one worker at a time: the leading run of full
    blocks, then the largest hit <= it whose `need` blocks before it (or all blocks
    before it, when fewer) the sliding group holds."""
    full, sliding = held.get((worker, FULL), set()), held.get((worker, SLIDING), set())
    n = 0
    while n < len(hashes) and hashes[n] in full:
        n += 1
    if not need:
        return n
    for hit in range(n, 0, -1):
        if all(h in sliding for h in hashes[max(0, hit - need) : hit]):
            return hit
    return 0


def test_matching_equals_the_reference_under_random_events():
    """Random stored / removed / reset events over 20 workers (bits are freed and reused
    as workers come and go), checked against per-worker sets after every few events."""
    rng = random.Random(11)
    chains = [[bytes([c, i]) * 8 for i in range(24)] for c in range(4)]
    workers = [f"w{i}" for i in range(20)]
    index = PrefixIndex()
    held: dict[tuple[str, str], set[bytes]] = {}
    checked = 0
    for step in range(3000):
        w = rng.choice(workers)
        roll = rng.random()
        if roll < 0.01:
            index.reset(w)
            for group in (FULL, SLIDING):
                held.pop((w, group), None)
        else:
            group = FULL if rng.random() < 0.6 else SLIDING
            h = rng.choice(rng.choice(chains)[: rng.randint(1, 24)])
            if roll < 0.7:
                index.stored(w, group, h)
                held.setdefault((w, group), set()).add(h)
            else:
                index.removed(w, group, h)
                held.get((w, group), set()).discard(h)
        if step % 10:
            continue
        expected_workers = {w for (w, _), blocks in held.items() if blocks}
        assert index.workers == expected_workers
        for w in workers:
            assert index.blocks(w) == {(g, h) for (x, g), b in held.items() if x == w for h in b}
        chain = rng.choice(chains)[: rng.randint(0, 24)]
        asked = rng.sample(workers, rng.randint(1, len(workers))) + ["nobody"]
        for need in (0, 1, 2, 5):
            got = index.matched_blocks(iter(chain), asked, need)
            want = {w: _reference_match(held, w, chain, need) for w in asked}
            assert got == want, (step, need)
            checked += any(want.values())
    assert checked > 100  # real hits were compared, not only misses


def test_other_groups_are_kept_but_never_matched():
    index = PrefixIndex()
    index.stored("a", "chunked", H[0])
    assert index.holds("a", "chunked", H[0]) and not index.holds("a", FULL, H[0])
    assert index.blocks("a") == {("chunked", H[0])} and index.workers == {"a"}
    assert index.matched_blocks(H[:2], ["a"]) == {"a": 0}
    index.stored("b", FULL, H[0])
    index.removed("a", "chunked", H[0])
    assert index.workers == {"b"} and not index.holds("a", "chunked", H[0])
    assert index.matched_blocks(H[:2], ["a", "b"], sliding_blocks=0) == {"a": 0, "b": 1}


def test_blocks_by_group_and_release_of_a_worker():
    """Blocks are kept per worker and group: blocks() lists exactly the pairs held, a
    group emptied by removals is gone, and a worker holding nothing releases its bits
    (reused by the next worker, whose matches then start from nothing)."""
    index = PrefixIndex()
    index.stored("a", FULL, H[0])
    index.stored("a", SLIDING, H[0])
    index.stored("a", "other", H[2])
    index.stored("a", FULL, H[0])  # again: still one block
    assert index.blocks("a") == {(FULL, H[0]), (SLIDING, H[0]), ("other", H[2])}
    assert index.num_blocks("a") == 3
    index.removed("a", SLIDING, H[0])
    index.removed("a", SLIDING, H[0])  # already gone: nothing happens
    index.removed("a", "other", H[1])  # never held: nothing happens
    assert index.blocks("a") == {(FULL, H[0]), ("other", H[2])}
    index.removed("a", FULL, H[0])
    index.removed("a", "other", H[2])
    assert index.workers == frozenset() and index.num_blocks() == 0
    index.stored("b", FULL, H[3])
    assert index.matched_blocks([H[0], H[3]], ["a", "b"]) == {"a": 0, "b": 0}
    assert index.matched_blocks([H[3]], ["a", "b"]) == {"a": 0, "b": 1}


def test_pending_prefixes_extend_the_cached_run_and_leave_with_their_request():
    chain = [bytes([i]) * 8 for i in range(10)]
    pending = PendingPrefixes(max_requests=3)
    held = {"a": 0, "b": 4, "c": 2}
    assert pending.extend(chain, held) == held  # nothing pending: the index's figures
    # A cold prompt placed on a (its cache held none of it): the whole chain is pending.
    first = pending.add("a", chain[:8])
    # b's cache holds 4 blocks; its pending run starts where the cache stopped.
    second = pending.add("b", chain[4:10])
    assert pending.extend(chain, held) == {"a": 8, "b": 10, "c": 2}
    # A run that does not continue what the cache holds adds nothing (c holds 2, pending
    # on b starts at 4); neither does a later turn diverging from the pending chain.
    assert pending.extend([*chain[:6], b"x" * 8], held) == {"a": 6, "b": 6, "c": 2}
    # Shared blocks are counted: a second request on a keeps them while the first ends.
    third = pending.add("a", chain[:3])
    pending.remove(first)
    assert pending.extend(chain, held) == {"a": 3, "b": 10, "c": 2}
    pending.remove(first)  # unknown keys (already removed) are ignored
    pending.remove(third)
    pending.remove(second)
    assert len(pending) == 0 and pending.index.num_blocks() == 0
    # At most max_requests are kept: the oldest goes first.
    keys = [pending.add(w, chain[:2]) for w in ("a", "b", "c", "d")]
    assert len(pending) == 3 and pending.extend(chain, {"a": 0, "d": 0}) == {"a": 0, "d": 2}
    for key in keys:
        pending.remove(key)
    assert pending.index.num_blocks() == 0 and not pending.index.workers
    with pytest.raises(ValueError, match="max_requests"):
        PendingPrefixes(max_requests=0)
