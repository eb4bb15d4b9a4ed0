"""Which worker holds which KV block: the router's exact view of every prefix cache.

The index is built only from the workers' own block events (stored / removed / reset,
read from their Redis streams by the cluster layer), keyed by the chained block hashes
the engine computes (workers.kv.block_hash), so it never guesses. A prompt's hashes are
computed with the same function; a worker's cached prefix is then the longest run of
leading hashes it holds in the full-attention group, shortened until the sliding group
also holds the window before it, which is exactly the engine's own rule:

    prompt blocks     h0  h1  h2  h3  h4  h5  (h6 partial: never matched)
    worker A full     h0  h1  h2  h3  h4  .       -> 5 blocks
    worker A sliding  .   .   .   h3  h4          -> window of 2 blocks before 5: ok -> 5
    worker B full     h0  h1  h2  .               -> 3 blocks
    worker B sliding  .   .   .                   -> nothing before 3 -> 0

Pure Python; it imports only the block-hash function of workers/.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from workers.kv.block_hash import BlockHash, hash_block, hash_prompt_blocks

FULL = "full"
SLIDING = "sliding"
_NOBODY: frozenset[str] = frozenset()


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


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """Hashes of the blocks a prompt could reuse: its full blocks, but never the whole
    prompt (the engine recomputes at least the last token to get its logits)."""
    usable = max(0, (len(token_ids) - 1) // block_size)
    return hash_prompt_blocks(token_ids[: usable * block_size], block_size)


def _lazy_hashes(token_ids: Sequence[int], block_size: int) -> Iterator[BlockHash]:
    """prompt_block_hashes, one block at a time, computed only when asked for."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    parent = None
    for start in range(0, (len(token_ids) - 1) // block_size * block_size, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        yield parent


class PrefixIndex:
    def __init__(self) -> None:
        # (group, hash) -> workers holding that block; and each worker's blocks, so a
        # reset or an expired worker is dropped in time proportional to what it held.
        self._holders: dict[tuple[str, BlockHash], set[str]] = {}
        self._blocks: dict[str, set[tuple[str, BlockHash]]] = {}

    # ------------------------------------------------------------------- events

    def stored(self, worker: str, group: str, block_hash: BlockHash) -> None:
        key = (group, block_hash)
        self._holders.setdefault(key, set()).add(worker)
        self._blocks.setdefault(worker, set()).add(key)

    def removed(self, worker: str, group: str, block_hash: BlockHash) -> None:
        key = (group, block_hash)
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(worker)
            if not holders:
                del self._holders[key]
        blocks = self._blocks.get(worker)
        if blocks is not None:
            blocks.discard(key)

    def reset(self, worker: str) -> None:
        """Forget every block of `worker` (restart, missed events, heartbeat expired)."""
        for key in self._blocks.pop(worker, ()):
            holders = self._holders[key]
            holders.discard(worker)
            if not holders:
                del self._holders[key]

    # ------------------------------------------------------------------ queries

    @property
    def workers(self) -> frozenset[str]:
        return frozenset(w for w, blocks in self._blocks.items() if blocks)

    def num_blocks(self, worker: str | None = None) -> int:
        if worker is None:
            return sum(len(b) for b in self._blocks.values())
        return len(self._blocks.get(worker, ()))

    def holds(self, worker: str, group: str, block_hash: BlockHash) -> bool:
        return worker in self._holders.get((group, block_hash), ())

    def blocks(self, worker: str) -> frozenset[tuple[str, BlockHash]]:
        """Every (group, block hash) the index says `worker` holds."""
        return frozenset(self._blocks.get(worker, ()))

    def cached_prompt_tokens(
        self,
        token_ids: Sequence[int],
        workers: Iterable[str],
        block_size: int,
        sliding_blocks: int = 0,
    ) -> dict[str, int]:
        """Prompt tokens each worker would find in its prefix cache (whole blocks)."""
        matched = self.matched_blocks(_lazy_hashes(token_ids, block_size), workers, sliding_blocks)
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
        result = {w: 0 for w in workers}
        alive = set(result)
        seen: list[BlockHash] = []
        # Walk the chain once, shrinking the set of workers still matching.
        for h in hashes if alive else ():
            holders = self._holders.get((FULL, h), _NOBODY)
            if not alive <= holders:
                for w in alive - holders:
                    result[w] = len(seen)
                alive &= holders
                if not alive:
                    break
            seen.append(h)
        for w in alive:
            result[w] = len(seen)
        if sliding_blocks:
            # Who holds each block in the sliding group, looked up once for all workers.
            sliding: dict[int, set[str] | frozenset[str]] = {}
            for w, n in result.items():
                result[w] = self._sliding_hit(w, seen, n, sliding_blocks, sliding)
        return result

    def _sliding_hit(
        self,
        worker: str,
        hashes: Sequence[BlockHash],
        n: int,
        need: int,
        sliding: dict[int, set[str] | frozenset[str]],
    ) -> int:
        """Largest hit <= n whose preceding `need` blocks the sliding group holds: right to
        left, the first run of `need` held blocks ends it (one pass, as the engine's
        _SlidingWindowTables.longest_hit); fewer blocks than that before the hit point
        only suffice from block 0. `sliding` caches block index -> holders."""
        run = 0
        for i in range(n - 1, -1, -1):
            holders = sliding.get(i)
            if holders is None:
                holders = sliding[i] = self._holders.get((SLIDING, hashes[i]), _NOBODY)
            if worker not in holders:
                run = 0
                continue
            run += 1
            if run == need:
                return i + run
        return run
