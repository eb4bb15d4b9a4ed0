"""Which worker holds which KV block: the router's exact view of every prefix cache.

The index is built only from the workers' own block events (stored / removed / reset,
read from their Redis streams by the cluster layer), keyed by the chained block hashes
the engine computes (tandem.workers.kv.block_hash), so it never guesses. A prompt's hashes are
computed with the same function; a worker's cached prefix is then the longest run of
leading hashes it holds in the full-attention group, shortened until the sliding group
also holds the window before it, which is exactly the engine's own rule:

    prompt blocks     h0  h1  h2  h3  h4  h5  (h6 partial: never matched)
    worker A full     h0  h1  h2  h3  h4  .       -> 5 blocks
    worker A sliding  .   .   .   h3  h4          -> window of 2 blocks before 5: ok -> 5
    worker B full     h0  h1  h2  .               -> 3 blocks
    worker B sliding  .   .   .                   -> nothing before 3 -> 0

Holders are bitmasks: each worker in the index owns two adjacent bits (while it holds any
block), 2i for the full group and 2i + 1 for the sliding group, and every hash maps to the
OR of its holders' bits in both groups:

    worker:        w0    w1    w2
    bits:         f  s  f  s  f  s        mask of h3 above, with A = w0, B = w1:
    h3            1  1  0  0  0  0        w0 holds h3 in both groups, w1 in neither

A lookup then ANDs masks along the prompt for all workers at once, and applies the
sliding rule to all of them in one right-to-left pass over the same masks (see
`_sliding_hits`). This runs on the request path of every ingress replica, with ~100k
blocks over 16 workers: per block it is one dict lookup and a few int operations. Groups
other than these two (none today) are kept, and reported by `blocks`, but never matched.

Pure Python; it imports only the block-hash function of workers/.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import reduce
from itertools import islice
from operator import or_

from tandem.router.hash_cache import PromptHashCache
from tandem.workers.kv.block_hash import BlockHash, iter_block_hashes

FULL = "full"
SLIDING = "sliding"


def sliding_blocks(sliding_window: int | None, block_size: int) -> int:
    """Blocks before a hit that the sliding group must hold: the window's earlier
    positions, ceil((window - 1) / block_size); 0 for a model without sliding layers."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if sliding_window is None:
        return 0
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    return -(-(sliding_window - 1) // block_size)


def usable_blocks(num_tokens: int, block_size: int) -> int:
    """Full blocks of a prompt that a cache could serve: never the whole prompt (the
    engine recomputes at least the last token to get its logits)."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return max(0, (num_tokens - 1) // block_size)


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """Hashes of the blocks a prompt could reuse (usable_blocks of them)."""
    return list(
        iter_block_hashes(
            token_ids, block_size, num_blocks=usable_blocks(len(token_ids), block_size)
        )
    )


class PrefixIndex:
    def __init__(self) -> None:
        # block hash -> OR of the bits of its holders, full and sliding group (see above).
        self._masks: dict[BlockHash, int] = {}
        # Any other group: group -> block hash -> OR of the holders' full-group bits.
        self._other: dict[str, dict[BlockHash, int]] = {}
        # Each worker's blocks by group, so a reset or an expired worker is dropped in time
        # proportional to what it held; a worker is here (and has bits) iff it holds any,
        # and a group iff the worker holds any block of it. Hashes sit in sets per group,
        # not as (group, hash) tuples: an event then allocates no object the garbage
        # collector tracks, which would bring its pauses onto the request path sooner.
        self._blocks: dict[str, dict[str, set[BlockHash]]] = {}
        self._bit: dict[str, int] = {}
        # worker -> its full-group bit (the sliding bit is the next one up).
        self._free_bits: list[int] = []
        self._next_bit = 0

    # ------------------------------------------------------------------- events

    def stored(self, worker: str, group: str, block_hash: BlockHash) -> None:
        bit = self._bit.get(worker)
        if bit is None:
            bit = self._bit[worker] = 1 << self._take_bit_index()
            self._blocks[worker] = {}
        groups = self._blocks[worker]
        held = groups.get(group)
        if held is None:
            held = groups[group] = set()
        holders, bit = self._group(group, bit)
        holders[block_hash] = holders.get(block_hash, 0) | bit
        held.add(block_hash)

    def removed(self, worker: str, group: str, block_hash: BlockHash) -> None:
        groups = self._blocks.get(worker)
        held = groups.get(group) if groups is not None else None
        if held is None or block_hash not in held:
            return
        held.discard(block_hash)
        if not held:
            del groups[group]
        self._drop(self._bit[worker], group, block_hash)
        if not groups:
            self._release(worker)

    def reset(self, worker: str) -> None:
        """Forget every block of `worker` (restart, missed events, heartbeat expired)."""
        groups = self._blocks.get(worker)
        if groups is None:
            return
        bit = self._bit[worker]
        for group, held in groups.items():
            for block_hash in held:
                self._drop(bit, group, block_hash)
        self._release(worker)

    def _group(self, group: str, bit: int) -> tuple[dict[BlockHash, int], int]:
        """The map holding `group`'s masks, and a worker's bit there (from its full bit)."""
        if group == FULL:
            return self._masks, bit
        if group == SLIDING:
            return self._masks, bit << 1
        return self._other.setdefault(group, {}), bit

    def _drop(self, bit: int, group: str, block_hash: BlockHash) -> None:
        holders, bit = self._group(group, bit)
        mask = holders[block_hash] & ~bit
        if mask:
            holders[block_hash] = mask
        else:
            del holders[block_hash]

    def _take_bit_index(self) -> int:
        # Freed bits are reused, so masks stay as narrow as the number of live workers.
        if self._free_bits:
            return self._free_bits.pop()
        self._next_bit += 2
        return self._next_bit - 2

    def _release(self, worker: str) -> None:
        """`worker` holds nothing any more: its bits are in no mask and can be reused."""
        del self._blocks[worker]
        self._free_bits.append(self._bit.pop(worker).bit_length() - 1)

    # ------------------------------------------------------------------ queries

    @property
    def workers(self) -> frozenset[str]:
        return frozenset(self._blocks)

    def num_blocks(self, worker: str | None = None) -> int:
        if worker is None:
            return sum(len(held) for groups in self._blocks.values() for held in groups.values())
        return sum(len(held) for held in self._blocks.get(worker, {}).values())

    def holds(self, worker: str, group: str, block_hash: BlockHash) -> bool:
        bit = self._bit.get(worker)
        if bit is None:
            return False
        holders, bit = self._group(group, bit)
        return bool(holders.get(block_hash, 0) & bit)

    def blocks(self, worker: str) -> frozenset[tuple[str, BlockHash]]:
        """Every (group, block hash) the index says `worker` holds."""
        groups = self._blocks.get(worker, {})
        return frozenset((group, h) for group, held in groups.items() for h in held)

    def cached_prompt_tokens(
        self,
        token_ids: Sequence[int],
        workers: Iterable[str],
        block_size: int,
        sliding_blocks: int = 0,
        hash_cache: PromptHashCache | None = None,
    ) -> dict[str, int]:
        """Prompt tokens each worker would find in its prefix cache (whole blocks). The
        prompt's blocks are hashed lazily: none past the longest cached prefix + 1.
        hash_cache: recent prompts' chains (an ingress's); the prompt's blocks it holds
        are not hashed again, and the ones hashed here are kept there."""
        num_blocks = usable_blocks(len(token_ids), block_size)
        if hash_cache is None:
            hashes = iter_block_hashes(token_ids, block_size, num_blocks=num_blocks)
            matched = self.matched_blocks(hashes, workers, sliding_blocks)
        else:
            if hash_cache.block_size != block_size:
                raise ValueError(
                    f"hash_cache is for block_size {hash_cache.block_size}, not {block_size}"
                )
            chain = hash_cache.chain(token_ids, num_blocks)
            matched = self.matched_blocks(chain, workers, sliding_blocks)
            hash_cache.remember(chain)
        return {w: n * block_size for w, n in matched.items()}

    def matched_blocks(
        self,
        hashes: Iterable[BlockHash],
        workers: Iterable[str],
        sliding_blocks: int = 0,
    ) -> dict[str, int]:
        """Cached prefix length, in blocks, of the prompt with these block hashes on each
        worker. sliding_blocks: how many blocks before the hit the sliding group must
        hold (ceil((window - 1) / block_size)); 0 when the model has no sliding layers.
        `hashes` is consumed only while some worker still matches: a lazy iterable
        (cached_prompt_tokens) hashes no block past the longest cached prefix."""
        result = dict.fromkeys(workers, 0)
        bit_of = self._bit
        # Parallel lists, not (worker, bit) pairs: fewer objects for the collector.
        indexed = [w for w in result if w in bit_of]
        bits = [bit_of[w] for w in indexed]
        alive = reduce(or_, bits, 0)
        if not alive:
            return result
        # Walk the chain once, ANDing the workers still matching (full-group bits) with each
        # block's holders; `ends` records (workers that stopped matching, blocks they
        # matched), `seen` the masks of the blocks matched, for the sliding rule.
        get = self._masks.get
        ends: list[tuple[int, int]] = []
        seen: list[int] = []
        keep = seen.append
        for h in hashes:
            mask = get(h, 0)
            still = alive & mask
            if still != alive:
                ends.append((alive & ~still, len(seen)))
                alive = still
                if not alive:
                    break
            keep(mask)
        if not seen:
            # Not even the first block is held anywhere (a cold prompt): nothing matched.
            return result
        if alive:
            ends.append((alive, len(seen)))
        if sliding_blocks:
            ends = self._sliding_hits(seen, ends, sliding_blocks)
        for mask, n in ends:
            if n:
                for w, bit in zip(indexed, bits, strict=True):
                    if bit & mask:
                        result[w] = n
        return result

    @staticmethod
    def _sliding_hits(
        masks: Sequence[int], ends: list[tuple[int, int]], need: int
    ) -> list[tuple[int, int]]:
        """The engine's sliding rule (as _SlidingWindowTables.longest_hit), for every
        worker at once: a worker matching n blocks keeps the largest hit h <= n whose
        `need` blocks before it its sliding group holds; with fewer than `need` blocks
        before h, all of them from block 0. Scanning right to left from n - 1, that is
        where the first run of `need` held blocks ends, or the run reaching block 0.

        masks: the matched blocks' masks; ends: (workers by full-group bit, blocks
        matched). runs[k]: workers whose run of held sliding blocks, counted from the
        current position rightwards, is at least k + 1 long (only workers still scanning).
        Shifting a mask right by one puts each worker's sliding bit on its full bit.
        """
        any_held = reduce(or_, masks, 0) >> 1
        # Workers holding no sliding block of the prompt can only hit 0 blocks.
        starts = sorted(
            ((mask & any_held, n) for mask, n in ends if n and mask & any_held), key=lambda e: e[1]
        )
        out: list[tuple[int, int]] = []
        scanning = 0
        runs = [0] * need
        for i in range(starts[-1][1] - 1 if starts else -1, -1, -1):
            while starts and starts[-1][1] == i + 1:
                scanning |= starts.pop()[0]
            s = masks[i] >> 1 & scanning
            for k in range(need - 1, 0, -1):
                runs[k] = runs[k - 1] & s
            runs[0] = s
            done = runs[need - 1]
            if done:
                out.append((done, i + need))
                scanning &= ~done
                runs = [r & scanning for r in runs]
            if not scanning and not starts:
                return out
        # Runs that reached block 0 shorter than `need`: the longest first.
        for k in range(need - 1, -1, -1):
            if runs[k] & scanning:
                out.append((runs[k] & scanning, k + 1))
                scanning &= ~runs[k]
        return out


class PendingPrefixes:
    """Prompts an ingress placed whose blocks the chosen replica has not computed yet,
    matched like the index's blocks.

        add(replica, block hashes) -> key   at placement (the replica that computes it)
        remove(key)                         when the request ends (the index has its
                                            blocks by then, from the replica's events)

    The prefix index learns a prompt's blocks only once the replica has computed them.
    Until then a second request sharing the prompt (the next question about the same
    document, while the first still waits in a queue) would find it cached nowhere and
    be placed by load alone: it computes the same blocks elsewhere. Under load, queues
    are long, so every request of a hot prefix arriving within one queue wait computes
    a copy, the copies evict other prefixes, and the extra work lengthens the queues
    (bench/router_sim.py, RAG: the pool never recovers from a cold start). Counting the
    pending prompts as cached where they will be sends such requests after the first.

    Reference counts per (replica, block): requests sharing blocks on one replica keep
    them pending until the last one ends. At most `max_requests` are kept; beyond that
    the oldest are dropped (a request whose end was never reported).
    """

    def __init__(self, max_requests: int = 4096) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        self.max_requests = max_requests
        self.index = PrefixIndex()
        self._refs: dict[tuple[str, BlockHash], int] = {}
        self._requests: dict[int, tuple[str, list[BlockHash]]] = {}
        self._next_key = 0

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, replica: str, hashes: Sequence[BlockHash]) -> int:
        """`replica` will hold these blocks (a run of a prompt's blocks, in order: those
        after what its cache held at placement)."""
        key = self._next_key
        self._next_key += 1
        hashes = list(hashes)
        self._requests[key] = (replica, hashes)
        refs = self._refs
        for h in hashes:
            n = refs.get((replica, h), 0)
            refs[(replica, h)] = n + 1
            if not n:
                self.index.stored(replica, FULL, h)
        while len(self._requests) > self.max_requests:
            self.remove(next(iter(self._requests)))
        return key

    def remove(self, key: int) -> None:
        """The request `key` ended (or will never compute its prompt); unknown keys
        (dropped as oldest) are ignored."""
        entry = self._requests.pop(key, None)
        if entry is None:
            return
        replica, hashes = entry
        refs = self._refs
        for h in hashes:
            n = refs[(replica, h)] - 1
            if n:
                refs[(replica, h)] = n
            else:
                del refs[(replica, h)]
                self.index.removed(replica, FULL, h)

    def extend(self, hashes: Sequence[BlockHash], held: Mapping[str, int]) -> dict[str, int]:
        """Each worker's cached prefix of the prompt, in blocks, with the pending blocks
        that continue it: `held` (worker -> blocks its cache holds, from the index)
        extended by the run of pending blocks from there. Only what a placement did not
        find cached is kept pending (add's blocks start where the index stopped), so a
        chat's next turn adds its new blocks, not its whole history."""
        out = dict(held)
        if not self._requests:
            return out
        starts: dict[int, list[str]] = {}
        for worker, n in held.items():
            if n < len(hashes):
                starts.setdefault(n, []).append(worker)
        for n, workers in starts.items():
            for worker, run in self.index.matched_blocks(islice(hashes, n, None), workers).items():
                if run:
                    out[worker] = n + run
        return out
