"""Per-request block tables over the hybrid KV cache: one BlockPool per KV group.

gpt-oss alternates full-attention and sliding-window layers. Each kind of layer is a *group*
with its own block space (see the brief's paged-cache contract); a request holds a block
table per group, all indexed by logical block (position // block_size):

    positions      0       8       16      24      32  35          (block_size 8, window 16)
    full group    [ 4 ]   [ 9 ]   [ 2 ]   [ 7 ]   [ 5 ]            every block, always
    sliding group [ -1]   [ -1]   [ 3 ]   [ 0 ]   [ 8 ]            only blocks the window
                                                                   still reads; -1 released

A sliding layer's query at position p reads positions (p - window, p]. Once a request has
computed C tokens, the next query is at position C, so every block wholly before position
C - window + 1 is dead for it: `release_out_of_window` frees those blocks (they stay cached
in the pool's free queue, and later requests can still hit them).

Prefix caching: a hit of L tokens (a multiple of block_size) needs, per group,

    full group     blocks 0 .. L/bs - 1              (the whole chain)
    sliding group  blocks first_needed(L) .. L/bs-1  (those overlapping (L - window, L))

so `find_cached_prefix` takes the longest L that every group can serve.

Contract with the scheduler (paired check/act, nothing here decides *what* to run):
  * `find_cached_prefix` and `can_allocate` never mutate;
  * the first `allocate` of a request treats tokens [0, request.num_computed_tokens) as a
    prefix hit that `find_cached_prefix` reported just before (takes those blocks); later
    calls only extend the tables; `try_extend` is check-and-extend in one pass for a
    request that holds blocks (the per-step path: its cost does not grow with context);
  * block tables are kept as block ids beside the blocks, changed with them, so
    `block_table` copies a list instead of rebuilding it;
  * after the step ran: `cache_full_blocks` then `release_out_of_window`;
  * `free` returns every block the request holds; a request with no blocks is not known here.
"""

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tandem.workers.engine.request import Request
from tandem.workers.kv import block_hash
from tandem.workers.kv.block_hash import BlockHash
from tandem.workers.kv.block_pool import BlockPool, BlockStored, KVBlock, KVCacheEvent

# Looks up logical block i of the request being examined in one pool (None on a miss).
_Lookup = Callable[[int], KVBlock | None]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVGroup:
    """What the cache manager needs of a KV group (the lead maps config.kv_groups to it)."""

    # Group name, used in events ("full" / "sliding").
    name: str
    # Window of the group's layers in tokens; None for full attention.
    sliding_window: int | None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("KVGroup.name must not be empty")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"KVGroup.sliding_window must be >= 1, got {self.sliding_window}")


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counted once per admission (first allocation) of a request."""

    # Admissions, including re-admissions after preemption.
    requests: int = 0
    # Tokens the admitted requests had to process (prompt, plus output after preemption).
    query_tokens: int = 0
    # Of those, tokens served from the prefix cache.
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class _GroupTables(ABC):
    """Block tables of one group; subclasses say which blocks a request still needs."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.tables: dict[str, list[KVBlock | None]] = {}
        # The same tables as physical block ids (-1 = none), kept in step with `tables` by
        # every change, so a step reads a request's table without rebuilding it.
        self.ids: dict[str, list[int]] = {}
        # Per request: logical blocks [0, n) went through cache_full_blocks.
        self.num_hashed: dict[str, int] = {}

    @abstractmethod
    def first_needed_block(self, num_computed: int) -> int:
        """First logical block that queries at positions >= num_computed may read."""

    @abstractmethod
    def longest_hit(self, lookup: _Lookup, max_blocks: int) -> int:
        """Largest n <= max_blocks such that a hit of n blocks is servable from the pool."""

    @abstractmethod
    def max_blocks_needed(self, num_tokens: int, max_chunk: int) -> int:
        """Most blocks one request of `num_tokens` tokens holds at once, fed in chunks of at
        most `max_chunk` tokens."""

    def hit_blocks(self, lookup: _Lookup, num_blocks: int) -> list[KVBlock | None]:
        first = self.first_needed_block(num_blocks * self.block_size)
        hits: list[KVBlock | None] = [None] * first
        for i in range(first, num_blocks):
            block = lookup(i)
            if block is None:
                raise RuntimeError(
                    f"group {self.pool.group}: block {i} of the claimed prefix hit is not cached"
                )
            hits.append(block)
        return hits

    def num_blocks_to_allocate(
        self, request_id: str, lookup: _Lookup, num_computed: int, num_tokens: int
    ) -> int:
        """Free blocks taken by giving the request slots up to `num_tokens` (hits that sit in
        the free queue count: touching them takes them out of it)."""
        needed = _cdiv(num_tokens, self.block_size)
        table = self.tables.get(request_id)
        if table is not None:
            return max(0, needed - len(table))
        hits = self.hit_blocks(lookup, num_computed // self.block_size)
        return needed - len(hits) + sum(1 for b in hits if b is not None and b.ref_cnt == 0)

    def allocate(
        self, request_id: str, lookup: _Lookup, num_computed: int, num_tokens: int
    ) -> None:
        table = self.tables.get(request_id)
        if table is None:
            table = self.hit_blocks(lookup, num_computed // self.block_size)
            # Touch before allocating, so the allocation cannot evict the hits.
            self.pool.touch(b for b in table if b is not None)
            self.tables[request_id] = table
            self.ids[request_id] = [-1 if b is None else b.block_id for b in table]
            self.num_hashed[request_id] = len(table)
        self.extend(request_id, num_tokens)

    def extend(self, request_id: str, num_tokens: int) -> None:
        """Grow a known request's table to cover `num_tokens` tokens."""
        table = self.tables[request_id]
        needed = _cdiv(num_tokens, self.block_size) - len(table)
        if needed > 0:
            new = self.pool.allocate(needed)
            table.extend(new)
            self.ids[request_id].extend(b.block_id for b in new)

    def cache_full_blocks(
        self, request: Request, hashes: Sequence[BlockHash], num_full: int
    ) -> None:
        table = self.tables[request.request_id]
        bs = self.block_size
        for i in range(self.num_hashed[request.request_id], num_full):
            block = table[i]
            if block is None:
                continue
            parent = hashes[i - 1] if i > 0 else None
            self.pool.cache_full_block(
                block, hashes[i], request.token_slice(i * bs, (i + 1) * bs), parent
            )
        self.num_hashed[request.request_id] = max(self.num_hashed[request.request_id], num_full)

    def release_skipped(self, request_id: str, num_computed: int) -> None:
        table = self.tables[request_id]
        ids = self.ids[request_id]
        released = []
        # Walk back from the last dead block; entries before a -1 were released earlier.
        for i in range(min(self.first_needed_block(num_computed), len(table)) - 1, -1, -1):
            block = table[i]
            if block is None:
                break
            released.append(block)
            table[i] = None
            ids[i] = -1
        if released:  # most steps release nothing: skip the pool call
            self.pool.free(released)

    def free(self, request_id: str) -> None:
        table = self.tables.pop(request_id, [])
        self.ids.pop(request_id, None)
        self.num_hashed.pop(request_id, None)
        self.pool.free(b for b in reversed(table) if b is not None)


class _FullAttentionTables(_GroupTables):
    def first_needed_block(self, num_computed: int) -> int:
        return 0

    def longest_hit(self, lookup: _Lookup, max_blocks: int) -> int:
        # The hashes are chained: the first miss ends the prefix.
        for i in range(max_blocks):
            if lookup(i) is None:
                return i
        return max_blocks

    def max_blocks_needed(self, num_tokens: int, max_chunk: int) -> int:
        return _cdiv(num_tokens, self.block_size)


class _SlidingWindowTables(_GroupTables):
    def __init__(self, pool: BlockPool, window: int) -> None:
        super().__init__(pool)
        self.window = window
        # A hit ending at a block boundary needs the window - 1 positions before it.
        self.blocks_per_hit = _cdiv(window - 1, self.block_size)

    def first_needed_block(self, num_computed: int) -> int:
        return max(0, (num_computed - self.window + 1) // self.block_size)

    def longest_hit(self, lookup: _Lookup, max_blocks: int) -> int:
        if self.blocks_per_hit == 0:
            return max_blocks
        # Right to left: the first run of blocks_per_hit consecutive hits ends the longest hit.
        run = 0
        for i in range(max_blocks - 1, -1, -1):
            if lookup(i) is None:
                run = 0
                continue
            run += 1
            if run == self.blocks_per_hit:
                return i + run
        # Fewer blocks than a window before the hit point: blocks 0..run-1 suffice.
        return run

    def max_blocks_needed(self, num_tokens: int, max_chunk: int) -> int:
        bound = _cdiv(self.window - 1 + max_chunk, self.block_size) + 1
        return min(_cdiv(num_tokens, self.block_size), bound)


class KVCacheManager:
    """Block tables of every request in every KV group, and prefix-cache lookups."""

    def __init__(
        self,
        groups: Sequence[KVGroup],
        block_size: int,
        num_blocks_per_group: Sequence[int],
        enable_prefix_caching: bool = True,
    ) -> None:
        if not groups:
            raise ValueError("groups must not be empty")
        if len(num_blocks_per_group) != len(groups):
            raise ValueError(
                f"num_blocks_per_group has {len(num_blocks_per_group)} entries, "
                f"groups has {len(groups)}"
            )
        if len({g.name for g in groups}) != len(groups):
            raise ValueError(f"group names must be unique: {[g.name for g in groups]}")
        self.groups = tuple(groups)
        self.block_size = block_size
        # Off: no prefix lookups and no block indexing (so no stored/removed events either).
        self.enable_prefix_caching = enable_prefix_caching
        self._tables: list[_GroupTables] = []
        for group, num_blocks in zip(groups, num_blocks_per_group, strict=True):
            pool = BlockPool(num_blocks, block_size, group.name)
            if group.sliding_window is None:
                self._tables.append(_FullAttentionTables(pool))
            else:
                self._tables.append(_SlidingWindowTables(pool, group.sliding_window))
        self._stats = PrefixCacheStats()

    # ---- queries (never mutate) -------------------------------------------------------

    @property
    def pools(self) -> tuple[BlockPool, ...]:
        return tuple(t.pool for t in self._tables)

    @property
    def num_free(self) -> tuple[int, ...]:
        """Allocatable blocks per group (cached free blocks included)."""
        return tuple(t.pool.num_free for t in self._tables)

    @property
    def usage(self) -> tuple[float, ...]:
        """Fraction of each group's blocks held by requests; the max is the binding one."""
        return tuple(t.pool.usage for t in self._tables)

    @property
    def prefix_stats(self) -> PrefixCacheStats:
        return self._stats

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._tables[0].tables

    def fits(self, num_tokens: int, max_chunk: int) -> bool:
        """Whether a request growing to `num_tokens` could ever run alone in these pools."""
        return all(
            t.max_blocks_needed(num_tokens, max_chunk) <= t.pool.num_blocks for t in self._tables
        )

    def find_cached_prefix(self, request: Request) -> int:
        """Tokens at the start of request.all_token_ids whose KV every group can serve.

        A multiple of block_size, and below request.num_tokens: the last known token is always
        recomputed, because its logits are needed.
        """
        if not self.enable_prefix_caching:
            return 0
        hashes = self._block_hashes(request)
        hit = (request.num_tokens - 1) // self.block_size
        # Full groups only ever shorten the hit, but the hit lengths a sliding group can serve
        # have gaps, so shortening for one group can require shortening for another: iterate
        # to a length every group accepts (hit only decreases, so this ends).
        while True:
            before = hit
            for t in self._tables:
                hit = t.longest_hit(self._lookup(t, request, hashes), hit)
            if hit == before:
                return hit * self.block_size

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Whether `allocate(request, num_new_tokens)` would succeed."""
        needs = self._needs(request, num_new_tokens)
        return all(n <= t.pool.num_free for t, n in zip(self._tables, needs, strict=True))

    def try_extend(self, request: Request, num_new_tokens: int) -> bool:
        """For a request that holds blocks: `allocate(request, num_new_tokens)` if
        `can_allocate` would allow it, else False with nothing changed. One pass, no hashing:
        the per-step path of a running request, whose cost does not grow with its length."""
        rid = request.request_id
        needed = _cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        for t in self._tables:
            if needed - len(t.tables[rid]) > t.pool.num_free:
                return False
        for t in self._tables:
            if needed > len(t.tables[rid]):
                t.extend(rid, needed * self.block_size)
        return True

    def block_table(self, request: Request, group: int) -> list[int]:
        """Physical block per logical block of the request in group `group`; -1 = none.
        A copy of the table kept up to date by every change (no rebuild per call)."""
        return list(self._tables[group].ids.get(request.request_id, ()))

    def slot_ids(self, request: Request, group: int, start: int, num_tokens: int) -> list[int]:
        """Cache slots (block_id * block_size + offset) of positions start..start+n-1."""
        ids = self._tables[group].ids[request.request_id]
        bs = self.block_size
        return [
            -1 if ids[pos // bs] < 0 else ids[pos // bs] * bs + pos % bs
            for pos in range(start, start + num_tokens)
        ]

    # ---- actions ----------------------------------------------------------------------

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        """Give the request slots for tokens up to num_computed_tokens + num_new_tokens.

        First call for a request: tokens [0, num_computed_tokens) are the prefix hit (a
        multiple of block_size) and their cached blocks are taken. Raises ValueError when
        the pools are short (check `can_allocate` first); nothing is changed then.
        """
        needs = self._needs(request, num_new_tokens)
        for t, n in zip(self._tables, needs, strict=True):
            if n > t.pool.num_free:
                raise ValueError(
                    f"request {request.request_id}: group {t.pool.group} needs {n} blocks, "
                    f"{t.pool.num_free} free"
                )
        first = not self.has_blocks(request.request_id)
        num_tokens = request.num_computed_tokens + num_new_tokens
        if not first:
            for t in self._tables:
                t.extend(request.request_id, num_tokens)
            return
        hashes = self._block_hashes(request)
        for t in self._tables:
            t.allocate(
                request.request_id,
                self._lookup(t, request, hashes),
                request.num_computed_tokens,
                num_tokens,
            )
        if first:
            s = self._stats
            self._stats = PrefixCacheStats(
                s.requests + 1,
                s.query_tokens + request.num_tokens,
                s.hit_tokens + request.num_computed_tokens,
            )

    def cache_full_blocks(self, request: Request) -> None:
        """Index every block whose tokens are now all computed, in every group."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        rid = request.request_id
        if all(t.num_hashed[rid] >= num_full for t in self._tables):
            return  # no block filled up since the last call (most decode steps)
        hashes = self._block_hashes(request)
        for t in self._tables:
            t.cache_full_blocks(request, hashes, num_full)

    def release_out_of_window(self, request: Request) -> None:
        """Free sliding-group blocks no later query of the request reads (after caching)."""
        for t in self._tables:
            t.release_skipped(request.request_id, request.num_computed_tokens)

    def free(self, request: Request) -> None:
        """Return every block of the request, tail blocks first in eviction order."""
        for t in self._tables:
            t.free(request.request_id)

    def snapshot(self) -> list[BlockStored]:
        """A stored event for every block a prefix lookup can find now, in every group, for
        readers that must rebuild their view. Clears pending events: the snapshot
        supersedes them. Parent hashes are not kept per block, so they are None."""
        self.drain_events()
        return [
            BlockStored(t.pool.group, b.block_hash, None, tuple(b.token_ids), b.block_id)
            for t in self._tables
            for b in t.pool.cached_blocks()
        ]

    def drain_events(self) -> list[KVCacheEvent]:
        """Stored/removed events of all groups since the last drain, group by group."""
        return [e for t in self._tables for e in t.pool.drain_events()]

    def check_integrity(self) -> None:
        """Pools are consistent and every block's ref count equals the tables' references."""
        for t in self._tables:
            t.pool.check_integrity()
            for request_id, table in t.tables.items():
                assert t.ids[request_id] == [-1 if b is None else b.block_id for b in table], (
                    f"group {t.pool.group}: request {request_id}'s block ids drifted from its table"
                )
            refs = Counter(b.block_id for table in t.tables.values() for b in table if b)
            for block in t.pool.blocks:
                assert block.ref_cnt == refs[block.block_id], (
                    f"group {t.pool.group}: {block} is referenced by "
                    f"{refs[block.block_id]} table entries"
                )

    # ---- internals --------------------------------------------------------------------

    def _needs(self, request: Request, num_new_tokens: int) -> list[int]:
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        num_computed = request.num_computed_tokens
        first = not self.has_blocks(request.request_id)
        if not first:
            # A running request only extends its tables: a cost independent of its length.
            needed = _cdiv(num_computed + num_new_tokens, self.block_size)
            rid = request.request_id
            return [max(0, needed - len(t.tables[rid])) for t in self._tables]
        if first and num_computed % self.block_size:
            raise ValueError(
                f"request {request.request_id}: a prefix hit must be whole blocks, "
                f"num_computed_tokens={num_computed}"
            )
        hashes = self._block_hashes(request) if first else []
        return [
            t.num_blocks_to_allocate(
                request.request_id,
                self._lookup(t, request, hashes),
                num_computed,
                num_computed + num_new_tokens,
            )
            for t in self._tables
        ]

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """request.block_hashes, extended to every full block of its tokens."""
        hashes = request.block_hashes
        bs = self.block_size
        for i in range(len(hashes), request.num_tokens // bs):
            parent = hashes[i - 1] if i > 0 else None
            tokens = request.token_slice(i * bs, (i + 1) * bs)
            # Through the module, so tests can swap the hash function to force collisions.
            hashes.append(block_hash.hash_block(parent, tokens, request.hash_extra))
        return hashes

    def _lookup(self, t: _GroupTables, request: Request, hashes: Sequence[BlockHash]) -> _Lookup:
        bs = self.block_size

        def lookup(i: int) -> KVBlock | None:
            return t.pool.get_cached(hashes[i], request.token_slice(i * bs, (i + 1) * bs))

        return lookup
