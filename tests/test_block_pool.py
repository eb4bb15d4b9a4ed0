"""BlockPool: exact block ids, LRU eviction order, collision guard, events."""

import pytest

from tandem.workers.kv.block_hash import hash_block
from tandem.workers.kv.block_pool import BlockPool, BlockRemoved, BlockStored

BS = 4


def _tokens(i: int) -> list[int]:
    return [i * 10 + k for k in range(BS)]


def _cache(pool: BlockPool, block, i: int, parent=None):
    h = hash_block(parent, _tokens(i))
    assert pool.cache_full_block(block, h, _tokens(i), parent)
    return h


def test_allocation_order_and_free_order():
    pool = BlockPool(6, BS, "full")
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert [x.block_id for x in a] == [0, 1, 2]
    assert [x.block_id for x in b] == [3, 4]
    assert pool.num_free == 1 and pool.usage == pytest.approx(5 / 6)
    # Tail first, as a request frees its blocks: block 2 is evicted first.
    pool.free(reversed(a))
    assert pool.free_block_ids() == [5, 2, 1, 0]
    assert [x.block_id for x in pool.allocate(2)] == [5, 2]
    pool.check_integrity()


def test_cached_free_block_is_hit_after_free_and_evicted_in_lru_order():
    pool = BlockPool(4, BS, "full")
    blocks = pool.allocate(3)
    hashes = [_cache(pool, blk, i) for i, blk in enumerate(blocks)]
    pool.free(reversed(blocks))  # queue: 3, 2, 1, 0
    assert pool.free_block_ids() == [3, 2, 1, 0]
    assert pool.num_free == 4

    # Hit after free: the block keeps its hash and leaves the queue from the middle.
    hit = pool.get_cached(hashes[1], _tokens(1))
    assert hit is blocks[1]
    pool.touch([hit])
    assert hit.ref_cnt == 1
    assert pool.free_block_ids() == [3, 2, 0]
    pool.check_integrity()

    assert pool.drain_events() == [
        BlockStored("full", hashes[0], None, tuple(_tokens(0)), 0),
        BlockStored("full", hashes[1], None, tuple(_tokens(1)), 1),
        BlockStored("full", hashes[2], None, tuple(_tokens(2)), 2),
    ]
    # Allocating 2 takes the never-cached block 3, then evicts cached block 2.
    got = pool.allocate(2)
    assert [x.block_id for x in got] == [3, 2]
    assert pool.get_cached(hashes[2], _tokens(2)) is None
    assert pool.drain_events() == [BlockRemoved("full", hashes[2])]
    assert pool.drain_events() == []
    # Block 0 is still cached; touching it again twice shares it.
    pool.touch([pool.get_cached(hashes[0], _tokens(0))] * 2)
    assert blocks[0].ref_cnt == 2 and pool.num_free == 0
    pool.check_integrity()


def test_freed_again_goes_to_tail_so_recent_blocks_survive_longer():
    pool = BlockPool(3, BS, "full")
    x, y, z = pool.allocate(3)
    hx, hy = _cache(pool, x, 0), _cache(pool, y, 1)
    pool.free([x])
    pool.free([y])
    pool.free([z])  # queue: x, y, z
    pool.touch([x])
    pool.free([x])  # touched again, so x is now most recent: y, z, x
    assert pool.free_block_ids() == [1, 2, 0]
    pool.drain_events()
    assert [b.block_id for b in pool.allocate(1)] == [1]
    assert pool.drain_events() == [BlockRemoved("full", hy)]
    assert pool.get_cached(hx, _tokens(0)) is x


def test_collision_guard_same_hash_different_tokens():
    pool = BlockPool(2, BS, "sliding")
    (blk,) = pool.allocate(1)
    fake = b"\x07" * 16
    assert pool.cache_full_block(blk, fake, _tokens(1), None)
    assert pool.get_cached(fake, _tokens(2)) is None
    assert pool.get_cached(fake, _tokens(1)) is blk
    # A second block with an already indexed hash stays unindexed (no event, no map entry).
    (other,) = pool.allocate(1)
    assert not pool.cache_full_block(other, fake, _tokens(2), None)
    assert other.block_hash is None
    assert pool.drain_events() == [BlockStored("sliding", fake, None, tuple(_tokens(1)), 0)]
    pool.free([other, blk])
    pool.check_integrity()


def test_parent_hash_in_event_and_misuse_errors():
    pool = BlockPool(2, BS, "full")
    a, b = pool.allocate(2)
    ha = _cache(pool, a, 0)
    hb = _cache(pool, b, 1, parent=ha)
    assert pool.drain_events()[1] == BlockStored("full", hb, ha, tuple(_tokens(1)), 1)
    with pytest.raises(RuntimeError, match="already cached"):
        pool.cache_full_block(a, hb, _tokens(1), None)
    with pytest.raises(ValueError, match="full block"):
        pool.cache_full_block(b, ha, [1, 2], None)
    with pytest.raises(ValueError, match="cannot allocate"):
        pool.allocate(1)
    pool.free([a])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([a])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, BS, "full")


def test_check_integrity_catches_corruption():
    pool = BlockPool(3, BS, "full")
    (blk,) = pool.allocate(1)
    blk.ref_cnt = 0  # in use per the queue, but claims no owner
    with pytest.raises(AssertionError):
        pool.check_integrity()
