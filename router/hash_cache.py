"""Recent prompts' block-hash chains at an ingress, so a chat's next turn hashes only its
new blocks.

A turn's prompt extends the previous turn's prompt, which this ingress usually placed,
and hashing it from scratch costs ~1 us a block on the request path. The cache keeps the
chains it computed in a radix tree over whole blocks: an edge holds a run of blocks'
token ids, encoded as the hash encodes them (bytes, tandem.workers.kv.block_hash.encode_tokens),
and their hashes, and is keyed under its parent by its first block's encoding. A lookup
encodes the prompt once (the hashes it lacks are computed from that same encoding) and
walks from the root comparing it with each edge (one memcmp an edge), so a hash is
reused only for tokens equal to those it was computed from (never on the strength of a
hash alone). Bytes, not tuples of ints: the garbage collector never scans them, where a
young tuple of a few thousand token ids made each collection that met one cost ~0.1 ms
more (1.5-3.6 ms pauses on the request path in bench/router_decision.py):

    root ─ [system prompt: 64 blocks] ─┬─ [conversation A: 40 blocks]   (leaf: a prompt)
                                       └─ [conversation B: 12 blocks] ─┬─ [B turn 2: 9]
                                                                       └─ [B retry: 3]
    next turn of A (64 + 40 + 7 blocks): 104 hashes from the tree, 7 to compute

A non-root node never has exactly one child (a turn that extends a leaf grows that leaf
in place; an eviction that leaves one child merges it into its parent), so each leaf is
one remembered prompt, or the remembered prompts sharing its path, and the tree has
fewer than twice as many nodes as leaves.

Bounded, least recently used first: at most `max_prompts` leaves and `max_bytes` of
Python memory for the token ids and hashes held; a lookup refreshes every node it walks.
Eviction drops whole leaves, oldest first (a lazy heap of leaf stamps).

Pure Python; it imports only the block-hash function of workers/.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tandem.workers.kv.block_hash import (
    BLOCK_HASH_BYTES,
    BlockHash,
    encode_tokens,
    iter_encoded_block_hashes,
)

# Python memory the cache counts: a token id is 4 bytes of a bytes object (its encoding),
# a hash a list slot and a 16-byte bytes object. Nodes (~300 bytes each, fewer than 2 a
# prompt) are not counted.
TOKEN_BYTES = 4
HASH_BYTES = 8 + 33 + BLOCK_HASH_BYTES


@dataclass(frozen=True)
class HashCacheConfig:
    max_prompts: int = 4096
    # Leaves of the tree: distinct prompts (a prompt extended by a later turn counts once).
    max_bytes: int = 128 * 2**20
    # Python memory of the token ids and hashes held (TOKEN_BYTES a token id, HASH_BYTES
    # a hash): 128 MiB is ~18M tokens with their hashes, ~4,500 prompts of 4k tokens.

    def __post_init__(self) -> None:
        for name in ("max_prompts", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HashCacheConfig.{name} must be an int >= 1, got {value!r}")


class _Node:
    __slots__ = ("tokens", "hashes", "children", "parent", "key", "stamp")

    def __init__(
        self,
        tokens: bytes,
        hashes: list[BlockHash],
        parent: _Node | None,
        key: bytes,
        stamp: int,
    ) -> None:
        self.tokens = tokens
        # This edge's blocks' token ids, encoded (encode_tokens): len(hashes) blocks.
        self.hashes = hashes
        self.children: dict[bytes, _Node] = {}
        # First block's encoded token ids -> child.
        self.parent = parent
        # None once evicted or merged away (its heap entries are then stale).
        self.key = key
        self.stamp = stamp
        # Last lookup or insertion that went through this node.


class PromptChain:
    """One prompt's block hashes: those the cache held, then the rest computed as they are
    iterated (so a lookup that stops early hashes nothing past where it stops). Pass it
    back to PromptHashCache.remember once iterated."""

    __slots__ = ("encoded", "block_size", "num_blocks", "cached", "computed", "_end", "_version")

    def __init__(
        self,
        encoded: bytes,
        block_size: int,
        num_blocks: int,
        cached: list[BlockHash],
        end: tuple[_Node, int],
        version: int,
    ) -> None:
        self.encoded = encoded
        # The prompt's token ids, encoded (encode_tokens).
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.cached = cached
        # Hashes of the first len(cached) blocks, from the cache.
        self.computed: list[BlockHash] = []
        # Hashes of the blocks after those, as far as iteration went.
        self._end = end
        # Where the lookup ended: a node and how many of its blocks matched.
        self._version = version
        # The cache's version at lookup; `_end` is only valid while it is unchanged.

    @property
    def hashes(self) -> list[BlockHash]:
        """Every hash known so far: cached, then computed."""
        return self.cached + self.computed

    def __iter__(self) -> Iterator[BlockHash]:
        # The hashes known so far, then the generator computing the rest, which appends
        # each to `computed` itself (no generator of ours between it and the caller).
        computed = self.computed
        known = len(self.cached) + len(computed)
        parent = computed[-1] if computed else (self.cached[-1] if self.cached else None)
        rest = iter_encoded_block_hashes(
            self.encoded,
            self.block_size,
            num_blocks=self.num_blocks,
            parent=parent,
            start_block=known,
            into=computed,
        )
        if not known:
            # Nothing cached or computed yet (a first sighting): the generator itself.
            return rest
        return itertools.chain(self.cached, computed[:], rest)


class PromptHashCache:
    """Recent prompts' chained block hashes (tandem.workers.kv.block_hash, no salt), for one
    block size. Not thread-safe: one event loop calls it.

        chain = cache.chain(prompt, num_blocks)   # the cached hashes, the rest lazily
        for h in chain: ...                        # as far as the caller needs
        cache.remember(chain)                      # keep what was computed
    """

    def __init__(self, block_size: int, config: HashCacheConfig | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.config = config or HashCacheConfig()
        self._clock = itertools.count(1)
        self._root = _Node(b"", [], None, b"", 0)
        self._heap: list[tuple[int, int, _Node]] = []
        # (stamp, tie-breaker, node) per leaf; stale entries are skipped when popped.
        self._ties = itertools.count()
        self._version = 0
        # Bumped by every change of the tree's shape.
        self.num_prompts = 0
        # Leaves.
        self.num_bytes = 0
        self.num_blocks = 0
        self.lookups = 0
        self.hits = 0
        # Lookups that found at least one block.
        self.reused_blocks = 0
        self.evicted_prompts = 0

    def clear(self) -> None:
        """Forget every chain (the lookup and eviction counts stay)."""
        # Unlinked, the nodes are freed at once, not left to the cycle collector (which
        # would then free them in one pause on the request path).
        stack = [self._root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            node.children, node.parent = {}, None
        self._root = _Node(b"", [], None, b"", 0)
        self._heap = []
        self._version += 1
        self.num_prompts = self.num_bytes = self.num_blocks = 0

    # ------------------------------------------------------------------ lookup

    def chain(self, token_ids: Sequence[int], num_blocks: int) -> PromptChain:
        """The hashes of the first `num_blocks` full blocks of `token_ids` (fewer if the
        prompt has fewer): the longest run the cache holds for exactly these tokens,
        then the rest computed lazily as the chain is iterated."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        # Encoded once: the edges are compared with it (byte strings: one memcmp, and
        # objects the garbage collector never scans), and the hashes computed from it.
        encoded = encode_tokens(token_ids)
        num_blocks = min(num_blocks, len(token_ids) // self.block_size)
        cached, end = self._walk(encoded, num_blocks)
        self.lookups += 1
        if cached:
            self.hits += 1
            self.reused_blocks += len(cached)
        return PromptChain(encoded, self.block_size, num_blocks, cached, end, self._version)

    def _walk(self, encoded: bytes, num_blocks: int) -> tuple[list[BlockHash], tuple[_Node, int]]:
        """Follow the prompt (encoded) down the tree, refreshing the nodes it passes.
        Returns the hashes found and where the walk ended: a node and how many of its
        blocks matched."""
        bs = 4 * self.block_size
        stamp = next(self._clock)
        node, matched, pos = self._root, 0, 0
        hashes: list[BlockHash] = []
        while pos < num_blocks:
            first = pos * bs
            child = node.children.get(encoded[first : first + bs])
            if child is None:
                break
            n = min(len(child.hashes), num_blocks - pos)
            edge = child.tokens if n == len(child.hashes) else child.tokens[: n * bs]
            if encoded[first : first + n * bs] != edge:
                n = self._common_blocks(child.tokens, encoded, first, n)
            node, matched = child, n
            node.stamp = stamp
            hashes += child.hashes if n == len(child.hashes) else child.hashes[:n]
            pos += n
            if n < len(child.hashes):
                break
        if node is not self._root and not node.children:
            self._push(node)
        return hashes, (node, matched)

    def _common_blocks(self, edge: bytes, encoded: bytes, first: int, n: int) -> int:
        """Whole blocks `edge` and the prompt from byte `first` share (block 0 is known
        equal, block n - 1 or an earlier one differs): a binary search over prefixes."""
        bs = 4 * self.block_size
        lo, hi = 1, n - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if edge[: mid * bs] == encoded[first : first + mid * bs]:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # ------------------------------------------------------------------ insertion

    def remember(self, chain: PromptChain) -> None:
        """Keep the hashes `chain` computed (with those it found) for later prompts that
        extend the same tokens; then evict down to the bounds."""
        if not chain.computed:
            return
        tokens, bs = chain.encoded, 4 * self.block_size
        new = chain.computed
        if chain._version == self._version:
            node, matched = chain._end
            start = len(chain.cached)
        else:
            # The tree changed since this chain's lookup: find where it ends now.
            known = len(chain.cached) + len(new)
            found, (node, matched) = self._walk(tokens, known)
            start = len(found)
            if start == known:
                return
            new = chain.hashes[start:]
        added = tokens[start * bs : (start + len(new)) * bs]
        stamp = next(self._clock)
        self._version += 1
        if matched < len(node.hashes):
            self._split(node, matched)
        if node is not self._root and not node.children:
            # The previous turn's leaf: this prompt extends it, so it grows in place.
            node.tokens += added
            node.hashes += new
            node.stamp = stamp
            self._push(node)
        else:
            leaf = _Node(added, list(new), node, added[:bs], stamp)
            node.children[leaf.key] = leaf
            self.num_prompts += 1
            self._push(leaf)
        self.num_bytes += len(added) + HASH_BYTES * len(new)
        self.num_blocks += len(new)
        self._evict()

    def _split(self, node: _Node, k: int) -> None:
        """Cut `node` after its first k blocks; the rest becomes its only child (the
        caller adds a second one at once, keeping the one-child invariant)."""
        bs = 4 * self.block_size
        tail = node.tokens[k * bs :]
        rest = _Node(tail, node.hashes[k:], node, tail[:bs], node.stamp)
        rest.children = node.children
        for child in rest.children.values():
            child.parent = rest
        node.children = {rest.key: rest}
        node.tokens = node.tokens[: k * bs]
        del node.hashes[k:]
        if not rest.children:
            self._push(rest)

    def check_integrity(self) -> None:
        """Raise RuntimeError unless the tree and its counters agree (for tests)."""
        bs = 4 * self.block_size
        prompts = num_bytes = blocks = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            if len(node.tokens) != bs * len(node.hashes):
                raise RuntimeError("a node's token ids do not cover its hashes")
            if node is not self._root:
                if not node.hashes or node.key != node.tokens[:bs]:
                    raise RuntimeError("a node is empty or keyed by other tokens")
                if len(node.children) == 1:
                    raise RuntimeError("a non-root node has exactly one child")
                prompts += not node.children
            for key, child in node.children.items():
                if child.key != key or child.parent is not node:
                    raise RuntimeError("a child is misfiled")
            num_bytes += len(node.tokens) + HASH_BYTES * len(node.hashes)
            blocks += len(node.hashes)
            stack.extend(node.children.values())
        if (prompts, num_bytes, blocks) != (self.num_prompts, self.num_bytes, self.num_blocks):
            raise RuntimeError(
                f"counters {(self.num_prompts, self.num_bytes, self.num_blocks)} != tree "
                f"{(prompts, num_bytes, blocks)}"
            )

    # ------------------------------------------------------------------ eviction

    def _push(self, leaf: _Node) -> None:
        heapq.heappush(self._heap, (leaf.stamp, next(self._ties), leaf))
        if len(self._heap) > 4 * (self.num_prompts + 16):
            # Refreshed leaves leave stale entries behind: rebuild from the live leaves.
            self._heap = [(n.stamp, next(self._ties), n) for n in self._leaves()]
            heapq.heapify(self._heap)

    def _leaves(self) -> Iterator[_Node]:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                yield node

    def _evict(self) -> None:
        config = self.config
        while self.num_prompts > config.max_prompts or self.num_bytes > config.max_bytes:
            stamp, _, leaf = heapq.heappop(self._heap)
            if leaf.parent is None or leaf.children or leaf.stamp != stamp:
                continue
            self._version += 1
            parent = leaf.parent
            del parent.children[leaf.key]
            leaf.parent = None
            self.num_prompts -= 1
            self.evicted_prompts += 1
            self.num_bytes -= len(leaf.tokens) + HASH_BYTES * len(leaf.hashes)
            self.num_blocks -= len(leaf.hashes)
            if parent is not self._root and len(parent.children) == 1:
                self._merge(parent)

    def _merge(self, node: _Node) -> None:
        """Fold `node`'s only child into it (the child's entries in the heap go stale)."""
        (child,) = node.children.values()
        node.tokens += child.tokens
        node.hashes += child.hashes
        node.children = child.children
        for grandchild in node.children.values():
            grandchild.parent = node
        node.stamp = max(node.stamp, child.stamp)
        # Its heap entries keep it until popped: without its tokens and hashes.
        child.parent, child.tokens, child.hashes, child.children = None, (), [], {}
        if not node.children:
            self._push(node)
