"""KVCacheManager over a full group and a sliding group: exact tables, hits, events."""

import itertools

import pytest

from tandem.workers.engine.request import Request
from tandem.workers.kv import block_hash
from tandem.workers.kv.block_hash import hash_prompt_blocks
from tandem.workers.kv.block_pool import BlockRemoved, BlockStored
from tandem.workers.kv.cache_manager import KVCacheManager, KVGroup

BS = 8
WINDOW = 16
GROUPS = (KVGroup("full", None), KVGroup("sliding", WINDOW))
FULL, SLIDING = 0, 1


def _kv(full_blocks: int = 16, sliding_blocks: int = 8) -> KVCacheManager:
    return KVCacheManager(GROUPS, BS, (full_blocks, sliding_blocks))


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(request_id=rid, prompt_token_ids=tokens, max_tokens=1000)


def _step(kv: KVCacheManager, req: Request, n: int, sampled: int | None = None) -> None:
    """What the scheduler does around one step of n tokens for req."""
    kv.allocate(req, n)
    req.num_computed_tokens += n
    if sampled is not None:
        req.append_output_token(sampled)
    kv.cache_full_blocks(req)
    kv.release_out_of_window(req)


def _admit(kv: KVCacheManager, req: Request) -> int:
    req.num_computed_tokens = kv.find_cached_prefix(req)
    return req.num_computed_tokens


def test_first_allocation_tables_and_slots():
    kv = _kv()
    a = _req("a", list(range(20)))
    assert _admit(kv, a) == 0
    assert kv.can_allocate(a, 20)
    kv.allocate(a, 20)
    assert kv.block_table(a, FULL) == [0, 1, 2]
    assert kv.block_table(a, SLIDING) == [0, 1, 2]
    assert kv.slot_ids(a, FULL, 6, 4) == [6, 7, 8, 9]
    assert kv.num_free == (13, 5)
    assert kv.usage == pytest.approx((3 / 16, 3 / 8))
    kv.check_integrity()


def test_shared_prefix_hit_events_and_never_whole_prompt():
    kv = _kv()
    a = _req("a", list(range(20)))
    _admit(kv, a)
    _step(kv, a, 20, sampled=500)
    h0, h1 = hash_prompt_blocks(list(range(16)), BS)
    assert a.block_hashes == [h0, h1]
    t0, t1 = tuple(range(8)), tuple(range(8, 16))
    assert kv.drain_events() == [
        BlockStored("full", h0, None, t0, 0),
        BlockStored("full", h1, h0, t1, 1),
        BlockStored("sliding", h0, None, t0, 0),
        BlockStored("sliding", h1, h0, t1, 1),
    ]
    # 20 computed tokens: the next query (position 20) reads from position 5, block 0.
    assert kv.block_table(a, SLIDING) == [0, 1, 2]

    b = _req("b", list(range(16)) + [77, 78])
    assert _admit(kv, b) == 16
    kv.allocate(b, 2)
    assert kv.block_table(b, FULL) == [0, 1, 3]
    assert kv.block_table(b, SLIDING) == [0, 1, 3]
    assert kv.pools[FULL].blocks[1].ref_cnt == 2

    # A prompt that is exactly the cached 2 blocks recomputes its last block.
    c = _req("c", list(range(16)))
    assert kv.find_cached_prefix(c) == 8
    assert kv.prefix_stats.requests == 2
    assert kv.prefix_stats.query_tokens == 20 + 18
    assert kv.prefix_stats.hit_tokens == 16
    kv.free(a)
    kv.free(b)
    assert kv.num_free == (16, 8)
    kv.check_integrity()


def test_generated_tokens_extend_the_hash_chain():
    kv = _kv()
    a = _req("a", list(range(6)))
    _admit(kv, a)
    _step(kv, a, 6, sampled=100)
    _step(kv, a, 1, sampled=101)
    _step(kv, a, 1, sampled=102)  # computed 8 tokens: block 0 is full
    assert a.block_hashes == hash_prompt_blocks(list(range(6)) + [100, 101], BS)
    assert [type(e) for e in kv.drain_events()] == [BlockStored, BlockStored]


def test_sliding_group_stays_bounded_while_full_group_grows():
    kv = _kv(full_blocks=40, sliding_blocks=6)
    a = _req("a", list(range(40)))
    _admit(kv, a)
    # Prefill in chunks of 16: the sliding group holds at most ceil((15 + 16) / 8) + 1 blocks.
    for _ in range(2):
        _step(kv, a, 16)
        assert 6 - kv.num_free[SLIDING] <= 5
    _step(kv, a, 8, sampled=1000)
    held_max = 0
    while a.num_tokens < 304:
        _step(kv, a, 1, sampled=1000 + a.num_tokens)
        held = sum(b != -1 for b in kv.block_table(a, SLIDING))
        held_max = max(held_max, held)
        kv.check_integrity()
    # Decode: at most ceil((15 + 1) / 8) + 1 = 3 sliding blocks, while full holds them all.
    assert held_max == 3
    assert 6 - kv.num_free[SLIDING] <= 3
    assert kv.num_free[FULL] == 40 - 38  # positions 0..302 hold KV
    # 303 computed: the next query (position 303) reads from position 288, block 36.
    table = kv.block_table(a, SLIDING)
    assert len(table) == 38
    assert table[:36] == [-1] * 36 and -1 not in table[36:]
    assert -1 not in kv.block_table(a, FULL)
    kv.free(a)
    assert kv.num_free == (40, 6)
    kv.check_integrity()


def test_hit_limited_by_partially_evicted_sliding_group():
    kv = _kv(full_blocks=16, sliding_blocks=8)
    a_tokens = list(range(41))
    a = _req("a", a_tokens)
    _admit(kv, a)
    _step(kv, a, 41)
    # 41 computed: sliding blocks 0..2 lie before position 26 and were released (cached).
    assert kv.block_table(a, SLIDING) == [-1, -1, -1, 3, 4, 5]
    assert kv.pools[SLIDING].free_block_ids() == [6, 7, 2, 1, 0]
    kv.free(a)
    assert kv.pools[SLIDING].free_block_ids() == [6, 7, 2, 1, 0, 5, 4, 3]

    # d shares 3 blocks; the sliding window before position 24 needs blocks 1 and 2 only.
    d = _req("d", a_tokens[:24] + [999])
    assert _admit(kv, d) == 24
    kv.allocate(d, 1)
    assert kv.block_table(d, SLIDING) == [-1, 1, 2, 6]
    assert kv.block_table(d, FULL) == [0, 1, 2, 6]

    # e takes every free sliding block, evicting a's cached sliding blocks 0, 4, 3.
    kv.drain_events()
    e = _req("e", list(range(5000, 5040)))
    _admit(kv, e)
    kv.allocate(e, 40)
    assert kv.block_table(e, SLIDING) == [7, 0, 5, 4, 3]
    hashes = hash_prompt_blocks(a_tokens, BS)
    assert kv.drain_events() == [
        BlockRemoved("sliding", hashes[0]),
        BlockRemoved("sliding", hashes[4]),
        BlockRemoved("sliding", hashes[3]),
    ]

    # The full group still has all 5 blocks of a, but the sliding group serves only a hit
    # ending at block 3 (blocks 1, 2 held by d); block 0 is not needed for that.
    b = _req("b", a_tokens + list(range(1, 8)))
    assert kv.find_cached_prefix(b) == 24
    b.num_computed_tokens = 24
    assert not kv.can_allocate(b, 24)
    with pytest.raises(ValueError, match="sliding"):
        kv.allocate(b, 24)
    assert not kv.has_blocks("b")
    kv.free(e)
    assert kv.can_allocate(b, 24)
    kv.allocate(b, 24)
    assert kv.block_table(b, SLIDING) == [-1, 1, 2, 3, 4, 5]
    assert kv.block_table(b, FULL) == [0, 1, 2, 12, 13, 14]
    kv.check_integrity()
    kv.free(b)
    kv.free(d)
    assert kv.num_free == (16, 8)
    kv.check_integrity()


def test_sliding_hit_at_the_start_needs_no_full_window():
    kv = _kv()
    a = _req("a", list(range(12)))
    _admit(kv, a)
    _step(kv, a, 12)
    kv.free(a)
    # One cached block is a valid hit: everything before it is the start of the sequence.
    b = _req("b", list(range(12)) + [3])
    assert kv.find_cached_prefix(b) == 8


def test_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr(block_hash, "hash_block", lambda parent, tokens, extra=b"": b"\x01" * 16)
    kv = _kv()
    a = _req("a", list(range(17)))
    _admit(kv, a)
    _step(kv, a, 17)
    # Block 1 collides with block 0 and stays unindexed: one stored event per group.
    assert [(e.group, e.block_id) for e in kv.drain_events()] == [("full", 0), ("sliding", 0)]
    other = _req("o", list(range(100, 117)))
    assert kv.find_cached_prefix(other) == 0
    same = _req("s", list(range(17)))
    assert kv.find_cached_prefix(same) == 8
    kv.check_integrity()


def test_hash_extra_separates_caches():
    kv = _kv()
    a = _req("a", list(range(17)))
    _admit(kv, a)
    _step(kv, a, 17)
    salted = Request(
        request_id="b", prompt_token_ids=list(range(17)), max_tokens=1, hash_extra=b"tenant-2"
    )
    assert kv.find_cached_prefix(salted) == 0
    assert kv.find_cached_prefix(_req("c", list(range(17)))) == 16


def test_fits_and_validation():
    kv = _kv(full_blocks=4, sliding_blocks=3)
    assert kv.fits(32, 1)
    assert not kv.fits(33, 1)
    assert not kv.fits(32, 9)  # sliding: ceil((15 + 9) / 8) + 1 = 4 > 3
    with pytest.raises(ValueError, match="num_blocks_per_group"):
        KVCacheManager(GROUPS, BS, (4,))
    with pytest.raises(ValueError, match="unique"):
        KVCacheManager((GROUPS[0], GROUPS[0]), BS, (4, 4))
    with pytest.raises(ValueError, match="sliding_window"):
        KVGroup("sliding", 0)
    r = _req("r", list(range(20)))
    r.num_computed_tokens = 4
    with pytest.raises(ValueError, match="whole blocks"):
        kv.can_allocate(r, 1)


def _seed(kv: KVCacheManager, group: int, tokens: list[int], logical_blocks: set[int]) -> None:
    """Leave exactly these logical blocks of `tokens` cached (and free) in one group."""
    pool = kv.pools[group]
    hashes = hash_prompt_blocks(tokens, BS)
    for i in sorted(logical_blocks):
        (blk,) = pool.allocate(1)
        parent = hashes[i - 1] if i else None
        assert pool.cache_full_block(blk, hashes[i], tokens[i * BS : (i + 1) * BS], parent)
        pool.free([blk])


def _reference_hit(num_tokens: int, full: set[int], sliding: set[int], window: int) -> int:
    """Longest block-aligned L < num_tokens such that the query at position L finds every
    position it reads cached: all of 0..L-1 (full layers), and L-window+1..L-1 (sliding)."""
    for hit_blocks in range((num_tokens - 1) // BS, -1, -1):
        end = hit_blocks * BS
        if all(p // BS in full for p in range(end)) and all(
            p // BS in sliding for p in range(max(0, end - window + 1), end)
        ):
            return end
    return 0


@pytest.mark.parametrize("sliding_first", [False, True])
@pytest.mark.parametrize("window", [2, 8, 9, 16, 17, 24])
def test_find_cached_prefix_matches_brute_force_reference(window, sliding_first):
    tokens = list(range(1000, 1049))  # 6 full blocks + 1 token
    blocks = range(6)
    full_sets = [set(blocks), {0, 1, 2, 3}, {0, 1, 2, 4, 5}]
    groups = [KVGroup("full", None), KVGroup("sliding", window)]
    full_g, sliding_g = (1, 0) if sliding_first else (0, 1)
    if sliding_first:
        groups.reverse()
    for full, bits in itertools.product(full_sets, range(64)):
        sliding = {i for i in blocks if bits >> i & 1}
        kv = KVCacheManager(groups, BS, (8, 8))
        _seed(kv, full_g, tokens, full)
        _seed(kv, sliding_g, tokens, sliding)
        req = _req("r", tokens)
        expected = _reference_hit(len(tokens), full, sliding, window)
        assert kv.find_cached_prefix(req) == expected, (full, sliding)
        # The reported hit is allocatable as it stands: allocation takes exactly those blocks.
        req.num_computed_tokens = expected
        kv.allocate(req, len(tokens) - expected)
        kv.check_integrity()


def test_hits_in_the_free_queue_count_against_free_blocks():
    kv = _kv(full_blocks=4, sliding_blocks=8)
    a = _req("a", list(range(25)))
    _admit(kv, a)
    _step(kv, a, 25)
    kv.free(a)  # blocks 0..2 cached, all 4 free
    b = _req("b", list(range(24)) + [7] * 16)
    assert _admit(kv, b) == 24
    # 5 blocks in all: the 3 hits leave the free queue, so 2 new ones need 5 free, not 2.
    assert not kv.can_allocate(b, 16)
    assert kv.can_allocate(b, 8)
    kv.allocate(b, 8)
    assert kv.block_table(b, FULL) == [0, 1, 2, 3]
    kv.check_integrity()
