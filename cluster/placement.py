"""Placement as an ingress replica runs it: router/ objects joined with what this replica
reads from Redis and sees of its own requests.

    registry records ──┐                  prompt token ids
    InFlight (here) ───┴─> LoadView            │ chained block hashes (lazily)
                              │                v
    PrefixIndexFeeder ──> PrefixIndex ──> cached tokens per replica
                              │                │
                              └──> place(view, cached, policies, DisaggRule) ──> Placement
                                         │
                              decisions, imbalance, prefix reuse per pool (RouterMetrics,
                              and counted here for router_state())

IngressPlacement is what ClusterBackend places with; it owns the in-flight figures, the
prefix index feeder, and the accounting of what placement decided and what the workers
then reused. No Ray here: it is driven from the ingress's event loop.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from tandem.cluster.index_feeder import PrefixIndexFeeder
from tandem.cluster.metrics import RouterMetrics
from tandem.router.hash_cache import HashCacheConfig, PromptHashCache
from tandem.router.load import POOLS, InFlight, LoadView, ReplicaLoad, ReplicaMemo, WorkerRecord
from tandem.router.policies import DisaggRule, Placement, PlacementPolicy, place
from tandem.router.prefix_index import (
    PendingPrefixes,
    prompt_block_hashes,
    sliding_blocks,
    usable_blocks,
)
from tandem.workers.kv.block_hash import encode_tokens


@dataclass(frozen=True)
class PlacementConfig:
    rule: DisaggRule
    # When the decode replica prefills a prompt itself (DisaggConfig's threshold, and
    # the fraction of the prompt it already holds).
    block_size: int
    # Tokens per KV block of the engines: prompts are hashed as the workers hash them.
    sliding_window: int | None = None
    # The model's sliding window (None: no sliding layers); a cached prefix is only
    # usable with the window before it, as in the engine's own lookup.
    hash_cache: HashCacheConfig | None = HashCacheConfig()
    # Recent prompts' block-hash chains, so a chat's next turn hashes only its new blocks
    # (router/hash_cache.py; the same placements either way). None: hash every prompt.
    delta_load: bool = True
    # Join heartbeats with this ingress's in-flight figures by the delta rule (this
    # ingress's part fresh, the other replicas' part from the heartbeat; router/load.py);
    # False: by the larger of the two, which keeps drained replicas busy until the next
    # heartbeat (bench/router_sim.py measured both).
    decision_log: int = 256
    # The last this many decisions are kept with their inputs (the load view, the
    # cached tokens per replica) and reported by state(), so a decision can be replayed
    # through place() elsewhere (tests/test_router_replay.py replays a cluster's through
    # bench/router_sim.py's placement). 0: none kept.
    pending_prefixes: bool = True
    # Count the prompts this ingress placed and not yet seen end as cached on the replica
    # that computes them (router/prefix_index.py PendingPrefixes): the index only learns
    # of blocks once computed, so without this every request of a hot prefix arriving
    # while the first one queues computes a copy elsewhere. Needs an index.

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"PlacementConfig.block_size must be >= 1, got {self.block_size}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(
                f"PlacementConfig.sliding_window must be >= 1 or None, got {self.sliding_window}"
            )

    @property
    def sliding_blocks(self) -> int:
        return sliding_blocks(self.sliding_window, self.block_size)


@dataclass
class PoolTokens:
    """Prompt tokens of finished requests computed by one pool, and how much was reused."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    # Reported by the worker that computed the prompt (usage.cached_tokens).
    indexed_tokens: int = 0
    # What the prefix index said that worker held, at placement.
    oracle_tokens: int = 0
    # The longest prefix any replica of the pool held, at placement (the same index).
    oracle_any_tokens: int = 0
    # The longest prefix any replica of either pool held, at placement.

    def add(self, prompt: int, cached: int, indexed: int, oracle: int, oracle_any: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        self.indexed_tokens += indexed
        self.oracle_tokens += oracle
        self.oracle_any_tokens += oracle_any


def prompt_digest(prompt_token_ids: Sequence[int]) -> str:
    """A prompt's identity in the decision log (hex)."""
    return hashlib.blake2b(encode_tokens(prompt_token_ids), digest_size=12).hexdigest()


def decision_from_state(entry: Mapping) -> tuple[LoadView, int, dict[str, int], Placement]:
    """One of state()'s recent_decisions as place()'s inputs and its result:
    (view, prompt tokens, cached tokens per replica, placement)."""
    pools = {pool: tuple(ReplicaLoad(**r) for r in entry["view"][pool]) for pool in POOLS}
    placement = Placement(**entry["placement"])
    return LoadView(**pools), entry["prompt_tokens"], dict(entry["cached_tokens"]), placement


class IngressPlacement:
    """Decides placements and accounts for them. Call `start()` on the event loop that
    places (the index feeder follows the streams there), `close()` at the end."""

    def __init__(
        self,
        *,
        decode_policy: PlacementPolicy,
        prefill_policy: PlacementPolicy,
        config: PlacementConfig,
        index: PrefixIndexFeeder | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        """index: the prefix index and its feeder; None places without cache knowledge
        (every replica counts as holding nothing)."""
        self.decode_policy = decode_policy
        self.prefill_policy = prefill_policy
        self.config = config
        self.index = index
        self.hash_cache = (
            PromptHashCache(config.block_size, config.hash_cache)
            if index is not None and config.hash_cache is not None
            else None
        )
        self._metrics = metrics
        self.in_flight = InFlight()
        self.pending = PendingPrefixes() if index is not None and config.pending_prefixes else None
        self._pending_keys: dict[int, tuple[Placement, int]] = {}
        self.recent: deque[tuple[str, LoadView, dict[str, int], int, Placement]] = deque(
            maxlen=config.decision_log
        )
        # (prompt digest, view, cached tokens, prompt tokens, placement) per decision.
        # id(placement) -> (the placement, its PendingPrefixes key), until release().
        self._load_memo: ReplicaMemo = {}
        self.pool_tokens = {"prefill": PoolTokens(), "decode": PoolTokens()}
        self.decisions: Counter[str] = Counter()
        # "pool/policy/reason" and "disagg/reason" -> count, as the metrics have them.

    async def start(self) -> None:
        if self.index is not None:
            await self.index.start()

    async def close(self) -> None:
        if self.index is not None:
            await self.index.close()

    # ------------------------------------------------------------------ deciding

    def load_view(self, workers: Sequence[WorkerRecord]) -> LoadView:
        return LoadView.from_workers(
            workers,
            self.in_flight.counts(),
            self.in_flight.prompt_tokens(),
            self._load_memo,
            delta=self.config.delta_load,
        )

    def cached_tokens(self, prompt_token_ids: Sequence[int], view: LoadView) -> dict[str, int]:
        """Prompt tokens each replica of the view holds in its prefix cache (the index),
        or will hold once it computes the prompts pending there (PendingPrefixes)."""
        return self._cached(prompt_token_ids, view)[0]

    def _cached(
        self, prompt_token_ids: Sequence[int], view: LoadView
    ) -> tuple[dict[str, int], tuple[list, dict[str, int]] | None]:
        """cached_tokens, and when pending prefixes are kept, the prompt's block hashes
        (all of its usable blocks) and the blocks each replica's cache holds (index)."""
        if self.index is None:
            return {}, None
        index, bs = self.index.index, self.config.block_size
        if self.pending is None:
            cached = index.cached_prompt_tokens(
                prompt_token_ids,
                view.replica_ids(),
                bs,
                self.config.sliding_blocks,
                self.hash_cache,
            )
            return cached, None
        num_blocks = usable_blocks(len(prompt_token_ids), bs)
        if self.hash_cache is not None:
            chain = self.hash_cache.chain(prompt_token_ids, num_blocks)
            hashes = list(chain)
            self.hash_cache.remember(chain)
        else:
            hashes = prompt_block_hashes(prompt_token_ids, bs)
        held = index.matched_blocks(hashes, view.replica_ids(), self.config.sliding_blocks)
        cached = {w: n * bs for w, n in self.pending.extend(hashes, held).items()}
        return cached, (hashes, held)

    def place(
        self,
        prompt_token_ids: Sequence[int],
        workers: Sequence[WorkerRecord],
        *,
        dry_run: bool = False,
    ) -> Placement:
        """Where a request with this prompt goes now, among `workers` (registry records
        of this model). dry_run: decide on copies of the policies, so a round-robin
        cursor does not move, and count nothing (to explain placement)."""
        view = self.load_view(workers)
        decode_policy, prefill_policy = self.decode_policy, self.prefill_policy
        if dry_run:
            decode_policy, prefill_policy = copy.deepcopy((decode_policy, prefill_policy))
        cached, chain = self._cached(prompt_token_ids, view)
        placement = place(
            view,
            len(prompt_token_ids),
            decode_policy=decode_policy,
            prefill_policy=prefill_policy,
            rule=self.config.rule,
            cached_tokens=cached,
        )
        if not dry_run:
            self._count_decision(placement, view)
            if self.recent.maxlen:
                n = len(prompt_token_ids)
                self.recent.append((prompt_digest(prompt_token_ids), view, cached, n, placement))
            computes = self.computes(placement, len(prompt_token_ids))
            if chain is not None and computes is not None:
                # Pending: the blocks after those its cache held (from the index).
                hashes, held = chain
                start = held.get(computes[0], 0)
                key = self.pending.add(computes[0], hashes[start:])
                self._pending_keys[id(placement)] = (placement, key)
                if len(self._pending_keys) > self.pending.max_requests:
                    # Placements never released (dropped by PendingPrefixes as oldest).
                    del self._pending_keys[next(iter(self._pending_keys))]
        return placement

    def release(self, placement: Placement) -> None:
        """The request `placement` placed ended: its prompt is no longer pending (the
        index holds its blocks by now, from the replica's events). Idempotent."""
        entry = self._pending_keys.pop(id(placement), None)
        if entry is not None and self.pending is not None:
            self.pending.remove(entry[1])

    def computes(self, placement: Placement, num_prompt_tokens: int) -> tuple[str, int] | None:
        """The replica placement leaves the prompt to, and the tokens it must compute."""
        if placement.prefill is not None:
            return placement.prefill, num_prompt_tokens - placement.prefill_cached_tokens
        if placement.decode is not None:
            return placement.decode, num_prompt_tokens - placement.decode_cached_tokens
        return None

    # ------------------------------------------------------------------ accounting

    def _count_decision(self, placement: Placement, view: LoadView) -> None:
        counted = [("decode", self.decode_policy.name, placement.decode_reason)]
        if placement.prefill_choice:
            counted.append(("prefill", self.prefill_policy.name, placement.prefill_choice))
        counted = [c for c in counted if c[2]]
        for pool, policy, reason in counted:
            self.decisions[f"{pool}/{policy}/{reason}"] += 1
        self.decisions[f"disagg/{placement.prefill_reason}"] += 1
        if self._metrics is None:
            return
        for pool, policy, reason in counted:
            self._metrics.decision(pool, policy, reason)
        self._metrics.disagg(placement.prefill_reason)
        for pool in ("prefill", "decode"):
            self._metrics.imbalance(pool, view.imbalance(pool))

    def served(
        self, placement: Placement, prompt_tokens: int, cached_tokens: int, remote: bool
    ) -> None:
        """A finished request's prefix reuse, in the pool that computed its prompt:
        `remote` when its KV arrived from a prefill replica, else its decode replica
        computed it; `cached_tokens` as that worker reported."""
        pool = "prefill" if remote else "decode"
        if remote:
            oracle, indexed = placement.best_prefill_cached_tokens, placement.prefill_cached_tokens
        else:
            oracle, indexed = placement.best_decode_cached_tokens, placement.decode_cached_tokens
        oracle_any = max(placement.best_prefill_cached_tokens, placement.best_decode_cached_tokens)
        self.pool_tokens[pool].add(prompt_tokens, cached_tokens, indexed, oracle, oracle_any)
        if self._metrics is not None:
            self._metrics.prefix_tokens(pool, prompt_tokens, cached_tokens, oracle)

    def state(self) -> dict:
        """What placement decided so far and the index it decides from (JSON-able)."""
        state: dict = {
            "pool_tokens": {pool: asdict(t) for pool, t in self.pool_tokens.items()},
            "decisions": dict(self.decisions),
        }
        if self.index is not None:
            index = self.index.index
            state["index"] = {
                "digest": self.index.digest(),
                "blocks": {w: index.num_blocks(w) for w in sorted(index.workers)},
                "applied": self.index.applied,
                "resets": self.index.resets,
            }
        if self.pending is not None:
            state["pending_prompts"] = len(self.pending)
        state["recent_decisions"] = [
            {
                "prompt": digest,
                "prompt_tokens": n,
                "view": {pool: [asdict(r) for r in view.pool(pool)] for pool in POOLS},
                "cached_tokens": dict(cached),
                "placement": asdict(placement),
            }
            for digest, view, cached, n, placement in self.recent
        ]
        if self.hash_cache is not None:
            cache = self.hash_cache
            state["hash_cache"] = {
                "prompts": cache.num_prompts,
                "blocks": cache.num_blocks,
                "bytes": cache.num_bytes,
                "lookups": cache.lookups,
                "hits": cache.hits,
                "reused_blocks": cache.reused_blocks,
                "evicted_prompts": cache.evicted_prompts,
            }
        return state

    def report_index_size(self) -> None:
        if self._metrics is not None and self.index is not None:
            self._metrics.index_blocks(self.index.index.num_blocks())
