"""Placement: which decode replica, and which prefill replica (if any), serve a request.

    LoadView (router/load.py) ─┐
    cached prompt tokens per   ├──> place() ──> Placement(decode="d2", prefill="p0" | None,
    replica (PrefixIndex)     ─┘                 reasons, cached tokens, the pools' best)
                                  │
                                  ├─ decode pool:  PlacementPolicy (one per pool)
                                  ├─ the disaggregation decision: does the chosen decode
                                  │  replica prefill the prompt itself?
                                  └─ prefill pool: PlacementPolicy, only when it does not

The ingress decides once per request; the calls are then pinned to the chosen replicas
(cluster/routing.py). A policy is a plain object: no Ray, no Redis, no torch, so the
choice is testable on constructed states. Three policies share one interface:
RoundRobin, LeastLoaded and PrefixAware.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from tandem.router.load import LoadView, ReplicaLoad


@dataclass(frozen=True)
class PoolRequest:
    """One request as a policy sees it, in one pool."""

    replicas: Sequence[ReplicaLoad]
    # The pool's live replicas, sorted by id (LoadView keeps them so).
    num_prompt_tokens: int
    cached_tokens: Mapping[str, int] = field(default_factory=dict)
    # Replica id -> prompt tokens its prefix cache holds (PrefixIndex); absent: none.

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            raise ValueError(f"num_prompt_tokens must be >= 0, got {self.num_prompt_tokens}")

    def cached(self, replica_id: str) -> int:
        return self.cached_tokens.get(replica_id, 0)

    def uncached(self, replica_id: str) -> int:
        """Prompt tokens `replica_id` would have to compute."""
        return max(0, self.num_prompt_tokens - self.cached_tokens.get(replica_id, 0))

    def best_cached(self, replicas: Sequence[ReplicaLoad] | None = None) -> int:
        """The longest cached prefix over `replicas` (default: the whole pool)."""
        if replicas is None:
            return self._pool_best_cached
        cached = self.cached_tokens
        if not cached:
            return 0
        return max([cached.get(r.replica_id, 0) for r in replicas], default=0)

    @cached_property
    def _pool_best_cached(self) -> int:
        # Asked by the pool's policy and again by place(): computed once (the request
        # is frozen).
        return self.best_cached(self.replicas)


@dataclass(frozen=True)
class Choice:
    replica_id: str
    reason: str
    # Why this replica, for the decision metrics (each policy names its own reasons).


class PlacementPolicy(ABC):
    """Chooses one replica of a pool.

    Contract: `choose` returns a Choice naming one of `request.replicas`, or None when
    there are none. It never mutates the request; it may keep state of its own (a
    cursor). Called from one event loop.
    """

    name: str

    @abstractmethod
    def choose(self, request: PoolRequest) -> Choice | None:
        """The replica for this request."""


class RoundRobin(PlacementPolicy):
    """Each pool member in turn, in replica id order; ignores load and caches.

    The cursor counts requests, not replicas, so when the pool changes the order goes on
    over the new membership without resetting to its first replica.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, request: PoolRequest) -> Choice | None:
        replicas = request.replicas
        if not replicas:
            return None
        return Choice(replicas[next(self._turn) % len(replicas)].replica_id, "round_robin")


def _load_key(r: ReplicaLoad) -> tuple:
    return (r.outstanding / r.max_num_seqs, r.pending_prompt_tokens, r.kv_usage, r.replica_id)


class LeastLoaded(PlacementPolicy):
    """The replica with the fewest outstanding requests per sequence slot; ignores caches.

    Order of preference (lowest first):
      1. outstanding / max_num_seqs (ReplicaLoad.outstanding: heartbeat load joined with
         this ingress's in-flight count), so a bigger replica takes proportionally more;
      2. pending prompt tokens: between equally busy replicas, the one with less prefill
         work ahead of a new prompt;
      3. KV usage: the one with more room to grow sequences;
      4. replica id, so equal states always give the same answer.
    """

    name = "least_loaded"

    def choose(self, request: PoolRequest) -> Choice | None:
        if not request.replicas:
            return None
        return Choice(min(request.replicas, key=_load_key).replica_id, "least_loaded")


@dataclass(frozen=True)
class PrefixAwareConfig:
    """The cost PrefixAware minimises, per pool, in prompt-token equivalents."""

    prompt_weight: float = 1.0
    # Per prompt token the replica would compute: the prompt after its cached prefix.
    queued_weight: float = 1.0
    # Per prompt token already waiting there to be computed (its prefill queue).
    kv_weight: float = 0.0
    # Per KV token its running sequences hold (decode load; heartbeat KV usage).
    max_imbalance: int = 8
    # A replica is only eligible while its outstanding requests exceed the least busy
    # replica's by at most this many (see PrefixAware).
    slot_bound: bool = True
    # A replica whose outstanding requests fill its sequence slots (max_num_seqs) is only
    # eligible when every replica's do: a request there would wait for a slot, which the
    # cost (prompt tokens) does not see.
    copy_queue_ratio: float | None = None
    # A replica holding d fewer prompt tokens than the eligible replica holding the most
    # is only a candidate while its queued prompt tokens are <= copy_queue_ratio * d:
    # a prefix the pool holds is copied only onto a replica that would start it about
    # at once. None: no such rule (see PrefixAware).

    def __post_init__(self) -> None:
        for name in ("prompt_weight", "queued_weight", "kv_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"PrefixAwareConfig.{name} must be a finite number >= 0")
        ratio = self.copy_queue_ratio
        if ratio is not None and not (
            isinstance(ratio, int | float)
            and not isinstance(ratio, bool)
            and math.isfinite(ratio)
            and ratio >= 0
        ):
            raise ValueError("PrefixAwareConfig.copy_queue_ratio must be a finite number >= 0")
        if isinstance(self.max_imbalance, bool) or not isinstance(self.max_imbalance, int):
            raise ValueError("PrefixAwareConfig.max_imbalance must be an int")
        if self.max_imbalance < 0:
            raise ValueError(
                f"PrefixAwareConfig.max_imbalance must be >= 0, got {self.max_imbalance}"
            )
        if not isinstance(self.slot_bound, bool):
            raise ValueError("PrefixAwareConfig.slot_bound must be a bool")


class PrefixAware(PlacementPolicy):
    """The replica where the request costs least: prompt left to compute plus load.

        cost(r) = prompt_weight * (prompt tokens - tokens r has cached)
                + queued_weight * prompt tokens pending on r
                + kv_weight     * KV tokens in use on r

    Ties go to the less busy replica (outstanding per slot), then the lower id.

    Imbalance bound: only replicas with outstanding <= min(outstanding) + max_imbalance
    are eligible. A hot prefix cached on one replica makes that replica cheapest for
    every request sharing it; without the bound it would take them all. With it, the
    replica placement picks is never more than max_imbalance requests busier than the
    idlest one (as this ingress sees them), so as long as requests only arrive the
    spread max - min of outstanding requests in the pool stays <= max_imbalance + 1.
    Once the bound sends a request elsewhere, that replica computes (and caches) the hot
    prefix too, and later requests spread over both at the cached cost. Other ingress
    replicas' requests reach this view with the next heartbeat, so across N ingress
    replicas the true spread can exceed the bound by what the others placed within one
    heartbeat interval.

    Slot bound (slot_bound): a replica whose outstanding requests fill its max_num_seqs
    slots is not eligible while some replica within the imbalance bound has a free slot.
    The cost counts prompt tokens, not the wait for a sequence slot, so without this a
    hot prefix could queue requests behind full slots while other replicas idle.

    Copy rule (copy_queue_ratio): a replica holding d fewer prompt tokens than the
    eligible replica holding the most is a candidate only while its queued prompt
    tokens are <= copy_queue_ratio * d. Going elsewhere computes the prefix a second
    time and caches a second copy, which evicts other prefixes; that pays while the
    other replica is idle, but when every replica has a queue (a busy pool, a cold
    start) the copies are extra work that lengthens the queues that made them look
    worthwhile, and the pool does not recover (bench/router_sim.py, RAG). With the
    rule, a busy pool keeps each prefix where it is and only spare capacity takes
    copies.

    Weights (bench/router_sim.py, bench/RESULTS.md): decode KV in use is not prefill
    work, and an absolute KV term (kv_weight x tens of thousands of tokens) outweighs
    whole prompts, so the shipped kv_weight is 0. prompt_weight 2 > queued_weight 1:
    moving a request away from its cached prefix must save twice the tokens it
    recomputes (a copy costs cache space and work beyond this request's prefill).

    Reasons: "prefix" (the chosen replica holds the pool's longest cached prefix),
    "no_prefix" (no replica holds any of it), "load" (a longer prefix elsewhere cost
    more than the load here), "imbalance_bound" (every replica holding the longest
    prefix was too busy, or had no free slot, to be eligible).
    """

    name = "prefix_aware"

    def __init__(self, config: PrefixAwareConfig | None = None) -> None:
        self.config = config or PrefixAwareConfig()

    def cost(self, request: PoolRequest, r: ReplicaLoad) -> float:
        c = self.config
        return (
            c.prompt_weight * request.uncached(r.replica_id)
            + c.queued_weight * r.pending_prompt_tokens
            + c.kv_weight * r.kv_tokens_in_use
        )

    def eligible(self, replicas: Sequence[ReplicaLoad]) -> list[ReplicaLoad]:
        """The replicas within the imbalance bound of the least busy one (and with a free
        sequence slot, under slot_bound, unless none has one)."""
        bound = min([r.outstanding for r in replicas]) + self.config.max_imbalance
        slots = self._slots_matter(replicas, bound)
        return [
            r
            for r in replicas
            if r.outstanding <= bound and not (slots and r.outstanding >= r.max_num_seqs)
        ]

    def _slots_matter(self, replicas: Sequence[ReplicaLoad], bound: int) -> bool:
        """slot_bound applies: on, and a replica within the bound has a free slot."""
        return self.config.slot_bound and any(
            r.outstanding <= bound and r.outstanding < r.max_num_seqs for r in replicas
        )

    def choose(self, request: PoolRequest) -> Choice | None:
        replicas = request.replicas
        if not replicas:
            return None
        # Two passes over the pool (this runs twice per placement, on the request path):
        # the eligible replicas and the longest prefix in the pool and among them; then
        # the cheapest candidate by (cost, outstanding per slot, id).
        config = self.config
        bound = min([r.outstanding for r in replicas]) + config.max_imbalance
        slots = self._slots_matter(replicas, bound)
        cached = request.cached_tokens
        longest = longest_eligible = 0
        eligible = []
        for r in replicas:
            held = cached.get(r.replica_id, 0)
            if held > longest:
                longest = held
            if r.outstanding > bound or (slots and r.outstanding >= r.max_num_seqs):
                continue
            if held > longest_eligible:
                longest_eligible = held
            eligible.append((r, held))
        ratio = config.copy_queue_ratio
        cost = self.cost
        best: ReplicaLoad | None = None
        best_key: tuple[float, float, str] | None = None
        for r, held in eligible:
            if (
                ratio is not None
                and held < longest_eligible
                and r.pending_prompt_tokens > ratio * (longest_eligible - held)
            ):
                continue
            key = (cost(request, r), r.outstanding / r.max_num_seqs, r.replica_id)
            if best_key is None or key < best_key:
                best, best_key = r, key
        # Some replica is always a candidate: the least busy one is within the bound, the
        # slot rule only applies when one within the bound has a free slot, and the copy
        # rule never skips a replica holding the longest eligible prefix.
        assert best is not None
        chosen = cached.get(best.replica_id, 0)
        if longest == 0:
            reason = "no_prefix"
        elif chosen == longest:
            reason = "prefix"
        elif longest_eligible < longest:
            reason = "imbalance_bound"
        else:
            reason = "load"
        return Choice(best.replica_id, reason)


POLICY_NAMES: tuple[str, ...] = (RoundRobin.name, LeastLoaded.name, PrefixAware.name)


def make_policy(name: str, prefix_aware: PrefixAwareConfig | None = None) -> PlacementPolicy:
    """A fresh policy by its config name; `prefix_aware` configures PrefixAware only."""
    if name == RoundRobin.name:
        return RoundRobin()
    if name == LeastLoaded.name:
        return LeastLoaded()
    if name == PrefixAware.name:
        return PrefixAware(prefix_aware)
    raise ValueError(f"placement policy must be one of {sorted(POLICY_NAMES)}, got {name!r}")


# ------------------------------------------------------------------ place()


@dataclass(frozen=True)
class DisaggRule:
    """When the chosen decode replica prefills the prompt itself (no prefill replica)."""

    local_prefill_threshold: int
    # The prompt, or the part of it the decode replica has not cached, is shorter than
    # this: a transfer would cost more than it saves (DisaggConfig's threshold).
    skip_prefill_cached_fraction: float = 0.5
    # The decode replica already holds at least this fraction of the prompt: computing
    # the rest there is cheaper than a prefill replica recomputing what it lacks (prefill
    # replicas never hold the answers decode replicas generated). 1.0 turns the rule off
    # (a whole prompt is never cached: its last token is always computed).

    def __post_init__(self) -> None:
        if self.local_prefill_threshold < 0:
            raise ValueError(
                f"local_prefill_threshold must be >= 0, got {self.local_prefill_threshold}"
            )
        if not 0.0 < self.skip_prefill_cached_fraction <= 1.0:
            raise ValueError(
                "skip_prefill_cached_fraction must be within (0, 1], "
                f"got {self.skip_prefill_cached_fraction}"
            )

    def local_reason(self, num_prompt_tokens: int, decode_cached: int) -> str | None:
        """Why the decode replica prefills locally, or None when a prefill replica should."""
        if num_prompt_tokens < self.local_prefill_threshold:
            return "short_prompt"
        if num_prompt_tokens - decode_cached < self.local_prefill_threshold:
            return "short_uncached"
        if decode_cached >= self.skip_prefill_cached_fraction * num_prompt_tokens:
            return "mostly_cached"
        return None


@dataclass(frozen=True)
class Placement:
    """Where one request runs, and why."""

    decode: str | None
    # Decode replica id; None when the registry knows no decode worker (Redis down or the
    # pool still starting): the request router then picks on its own.
    prefill: str | None
    # Prefill replica id; None: the decode worker prefills the prompt itself.
    decode_reason: str = ""
    # The decode policy's Choice.reason ("" when no replica was chosen).
    prefill_reason: str = ""
    # "remote" (the prefill policy chose `prefill`; the policy's own reason is in
    # prefill_choice), or why the decode replica prefills: "short_prompt",
    # "short_uncached", "mostly_cached", "no_prefill_replica", "same_replica".
    prefill_choice: str = ""
    # The prefill policy's Choice.reason when it was asked.
    decode_cached_tokens: int = 0
    prefill_cached_tokens: int = 0
    # Prompt tokens the chosen replicas hold, as the prefix index sees them.
    best_decode_cached_tokens: int = 0
    best_prefill_cached_tokens: int = 0
    # The longest cached prefix of the prompt over each pool: what an oracle choosing
    # by cache alone would reuse there.


def place(
    view: LoadView,
    num_prompt_tokens: int,
    *,
    decode_policy: PlacementPolicy,
    prefill_policy: PlacementPolicy,
    rule: DisaggRule,
    cached_tokens: Mapping[str, int] | None = None,
) -> Placement:
    """Choose the decode replica, then decide whether it prefills the prompt itself, and
    if not, the prefill replica.

    cached_tokens: replica id -> prompt tokens its prefix cache holds (both pools).
    The decode worker checks the threshold rule again against its own cache (which the
    index may trail by an event flush); the router's decision is the one that can also
    use the "mostly cached" rule, because only it sees every cache.
    """
    if num_prompt_tokens < 0:
        raise ValueError(f"num_prompt_tokens must be >= 0, got {num_prompt_tokens}")
    cached = cached_tokens or {}
    decode_request = PoolRequest(view.decode, num_prompt_tokens, cached)
    prefill_request = PoolRequest(view.prefill, num_prompt_tokens, cached)
    decode = decode_policy.choose(decode_request)
    decode_id = decode.replica_id if decode is not None else None
    decode_cached = decode_request.cached(decode_id) if decode_id is not None else 0
    prefill_id, prefill_choice = None, ""
    reason = rule.local_reason(num_prompt_tokens, decode_cached)
    if reason is None:
        prefill = prefill_policy.choose(prefill_request)
        if prefill is None:
            reason = "no_prefill_replica"
        elif prefill.replica_id == decode_id:
            # A worker of role "both" picked for both halves: it prefills locally anyway.
            reason, prefill_choice = "same_replica", prefill.reason
        else:
            reason, prefill_id, prefill_choice = "remote", prefill.replica_id, prefill.reason
    return Placement(
        decode=decode_id,
        prefill=prefill_id,
        decode_reason=decode.reason if decode is not None else "",
        prefill_reason=reason,
        prefill_choice=prefill_choice,
        decode_cached_tokens=decode_cached,
        prefill_cached_tokens=prefill_request.cached(prefill_id) if prefill_id else 0,
        best_decode_cached_tokens=decode_request.best_cached(),
        best_prefill_cached_tokens=prefill_request.best_cached(),
    )
