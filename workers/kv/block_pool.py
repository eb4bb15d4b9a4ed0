"""One KV group's physical blocks: ref counts, an LRU free queue, and the prefix-cache index.

A block is in exactly one of two states:

    in use   ref_cnt > 0, not in the free queue
    free     ref_cnt == 0, in the free queue; it may still be *cached* (keeps its hash and
             its KV) until `allocate` pops it, so a later request can take it back (`touch`)

The free queue is the eviction order. `allocate` pops from the front; `free` appends at
the back; `touch` unlinks a cached free block from anywhere in the middle, hence a doubly
linked list through the blocks themselves (O(1), no allocation):

    head <-> [b3 h=a1] <-> [b0] <-> [b7 h=c4] <-> tail
             evicted first                 evicted last

Invariants (checked by `check_integrity`):
  * a block is in the free queue iff ref_cnt == 0;
  * block.block_hash is not None iff the hash map sends that hash to that very block.
At most one block is indexed per hash: a block that completes with a hash some other block
already holds (two requests computed the same prefix at once) stays unindexed and is simply
freed later, so the map and the emitted events describe exactly the findable blocks.

Events (`BlockStored`, `BlockRemoved`) mirror the hash map for the router's prefix index.
Block ids run 0..num_blocks-1, all usable; -1 marks "no block" in block tables.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tandem.workers.kv.block_hash import BlockHash


@dataclass(frozen=True)
class BlockStored:
    """A full block became findable by its hash."""

    group: str
    block_hash: BlockHash
    parent_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_id: int


@dataclass(frozen=True)
class BlockRemoved:
    """A cached block was evicted (reused for other tokens); its hash is no longer findable."""

    group: str
    block_hash: BlockHash


KVCacheEvent = BlockStored | BlockRemoved


class KVBlock:
    """Metadata of one physical block. Links are owned by the free queue."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        # The block's tokens, kept only while it is indexed: the guard against hash collisions.
        self.token_ids: tuple[int, ...] = ()
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash is not None else None
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={h})"


class FreeBlockQueue:
    """Doubly linked list of free blocks through `KVBlock.prev_free/next_free`, sentinels at
    both ends so no operation branches on emptiness."""

    def __init__(self, blocks: Sequence[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        block.prev_free, block.next_free = last, self._tail
        last.next_free = block
        self._tail.prev_free = block
        self.num_free += 1

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise RuntimeError(f"{block} is not in the free queue")
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def popleft(self) -> KVBlock:
        first = self._head.next_free
        if first is self._tail or first is None:
            raise RuntimeError("no free block")
        self.remove(first)
        return first

    def __iter__(self):
        node = self._head.next_free
        while node is not None and node is not self._tail:
            yield node
            node = node.next_free


class BlockPool:
    """The blocks of one KV group (`group` names it in events)."""

    def __init__(self, num_blocks: int, block_size: int, group: str) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.group = group
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self.blocks)
        self._by_hash: dict[BlockHash, KVBlock] = {}
        self._events: list[KVCacheEvent] = []

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: unused ones plus cached-but-free ones."""
        return self._free.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached free blocks count as free)."""
        return 1.0 - self._free.num_free / self.num_blocks

    def get_cached(self, block_hash: BlockHash, token_ids: Sequence[int]) -> KVBlock | None:
        """The block indexed under `block_hash` if it holds exactly `token_ids`; never mutates."""
        block = self._by_hash.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cache hits; a hit that was free leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._free.remove(block)
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[KVBlock]:
        """Pop `n` blocks from the LRU front, evicting their cached contents (ref_cnt -> 1)."""
        if n > self._free.num_free:
            raise ValueError(f"cannot allocate {n} blocks, {self._free.num_free} free")
        out = []
        for _ in range(n):
            block = self._free.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero join the queue tail in the
        given order, so pass a request's blocks tail first to have its tail evicted first."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free.append(block)

    def cache_full_block(
        self,
        block: KVBlock,
        block_hash: BlockHash,
        token_ids: Sequence[int],
        parent_hash: BlockHash | None,
    ) -> bool:
        """Index a block whose `block_size` tokens are computed. Returns False (and indexes
        nothing) when another block already holds this hash: see the module docstring."""
        if len(token_ids) != self.block_size:
            raise ValueError(f"a full block has {self.block_size} tokens, got {len(token_ids)}")
        if block.block_hash is not None:
            raise RuntimeError(f"{block} is already cached")
        if block_hash in self._by_hash:
            return False
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._by_hash[block_hash] = block
        self._events.append(
            BlockStored(self.group, block_hash, parent_hash, block.token_ids, block.block_id)
        )
        return True

    def cached_blocks(self) -> list[KVBlock]:
        """Every block findable by hash (in use or free but not yet evicted)."""
        return list(self._by_hash.values())

    def drain_events(self) -> list[KVCacheEvent]:
        """Events since the last drain, oldest first."""
        events, self._events = self._events, []
        return events

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        del self._by_hash[block.block_hash]
        self._events.append(BlockRemoved(self.group, block.block_hash))
        block.block_hash = None
        block.token_ids = ()

    def free_block_ids(self) -> list[int]:
        """The free queue front to back (eviction order); for tests and debugging."""
        return [b.block_id for b in self._free]

    def check_integrity(self) -> None:
        """Raise AssertionError unless ref counts, free queue and hash map agree."""
        queued = [b.block_id for b in self._free]
        assert len(queued) == len(set(queued)) == self._free.num_free, "free queue corrupt"
        queued_set = set(queued)
        for block in self.blocks:
            assert block.ref_cnt >= 0, f"{block} has a negative ref count"
            assert (block.ref_cnt == 0) == (block.block_id in queued_set), (
                f"{block} ref count disagrees with the free queue"
            )
            if block.block_hash is not None:
                assert self._by_hash.get(block.block_hash) is block, f"{block} not indexed"
                assert len(block.token_ids) == self.block_size, f"{block} lost its tokens"
        for block_hash, block in self._by_hash.items():
            assert block.block_hash == block_hash, f"hash map points at {block}"
