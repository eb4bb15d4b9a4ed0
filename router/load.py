"""The load view placement decides from: one entry per live worker, per pool.

Two sources, joined per replica id:

    Redis registry (every ingress sees the same)      this ingress only (fresh)
    ───────────────────────────────────────────       ─────────────────────────
    running, waiting, queued prompt tokens,           requests it sent to the replica
    KV usage, capacity; as of the last heartbeat      that have not finished yet, and
                                                      the prompt tokens it left there
                                                      to compute (until a first token)

Heartbeats lag by up to one interval, so a burst of requests placed between two
heartbeats would all see the same "least loaded" replica; the in-flight figures close
that gap. Neither source is complete alone: heartbeats see the other ingress replicas'
requests, the in-flight figures see this ingress's latest ones. Two joins:

  max    (no snapshot known) the larger of the two: never counts a request twice, but a
         replica that drained since its last heartbeat still looks as busy as then.
  delta  (LoadView.from_workers(..., delta=True) with a memo) this ingress's in-flight
         figure now, plus what the heartbeat held beyond this ingress's own figure at the
         time it first saw that heartbeat (the other ingress replicas' part):

             outstanding = in_flight_now + max(0, heartbeat - in_flight_at_heartbeat)

         This ingress's part is then always fresh (requests that finished since the
         heartbeat leave at once); only the other replicas' part waits for the next
         heartbeat. With one ingress, or with every ingress's counts shared, the view is
         exact between heartbeats (bench/router_sim.py: the max join made drained
         replicas look busy for up to a heartbeat interval).

Pure Python: no torch, no Ray, no Redis client (the caller passes worker records in).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

POOLS: tuple[str, ...] = ("prefill", "decode")


class _Load(Protocol):
    running: int
    waiting: int
    queued_prompt_tokens: int
    kv_usage: float


class _Capacity(Protocol):
    max_num_seqs: int
    kv_blocks: tuple[int, ...]
    block_size: int


class WorkerRecord(Protocol):
    """What LoadView reads of a registry record (tandem.workers.control_plane.WorkerInfo)."""

    replica_id: str
    role: str
    capacity: _Capacity
    load: _Load


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica as placement sees it."""

    replica_id: str
    running: int = 0
    # Sequences in its running batch (heartbeat).
    waiting: int = 0
    # Sequences admitted there but not yet scheduled (heartbeat).
    queued_prompt_tokens: int = 0
    # Prompt tokens still to prefill there (heartbeat).
    kv_usage: float = 0.0
    # Fraction of its KV blocks in use, 0..1 (heartbeat).
    in_flight: int = 0
    # Requests this ingress sent there that have not finished (local, fresh).
    in_flight_prompt_tokens: int = 0
    # Prompt tokens this ingress left there to compute, not yet computed (local, fresh).
    max_num_seqs: int = 1
    # Sequences it runs at once (capacity); normalises the request count.
    kv_capacity_tokens: int = 0
    # Tokens its full-attention KV group holds (capacity); scales kv_usage to tokens.
    in_flight_at_heartbeat: int | None = None
    in_flight_prompt_tokens_at_heartbeat: int | None = None
    # This ingress's in-flight figures when it first saw the heartbeat above: the delta
    # join (module docstring). None: unknown, join by the larger value.

    def __post_init__(self) -> None:
        if not self.replica_id:
            raise ValueError("ReplicaLoad.replica_id must be non-empty")
        counts = (
            self.running,
            self.waiting,
            self.queued_prompt_tokens,
            self.in_flight,
            self.in_flight_prompt_tokens,
            self.kv_capacity_tokens,
        )
        # One comparison on the placement path; the field is named only on failure.
        if min(counts) < 0:
            names = ("running", "waiting", "queued_prompt_tokens", "in_flight")
            names += ("in_flight_prompt_tokens", "kv_capacity_tokens")
            name, value = next((n, v) for n, v in zip(names, counts, strict=True) if v < 0)
            raise ValueError(f"ReplicaLoad.{name} must be >= 0, got {value}")
        if not 0.0 <= self.kv_usage <= 1.0:
            raise ValueError(f"ReplicaLoad.kv_usage must be within [0, 1], got {self.kv_usage}")
        if self.max_num_seqs < 1:
            raise ValueError(f"ReplicaLoad.max_num_seqs must be >= 1, got {self.max_num_seqs}")

    # The derived figures below are cached on the instance: an entry is immutable, and
    # the ingress reuses it across placements (ReplicaMemo), where policies read them for
    # every replica of a pool several times a decision.

    @cached_property
    def outstanding(self) -> int:
        """Requests on the replica, as well as this ingress can tell.

        The heartbeat's running + waiting already includes this ingress's requests that
        had arrived by then, so adding the in-flight count would count them twice; the
        larger of the two is a lower bound on the truth that never double counts.
        """
        if self.in_flight_at_heartbeat is None:
            return max(self.running + self.waiting, self.in_flight)
        others = self.running + self.waiting - self.in_flight_at_heartbeat
        return self.in_flight + (others if others > 0 else 0)

    @cached_property
    def pending_prompt_tokens(self) -> int:
        """Prompt tokens waiting to be computed there, joined like `outstanding`."""
        if self.in_flight_prompt_tokens_at_heartbeat is None:
            return max(self.queued_prompt_tokens, self.in_flight_prompt_tokens)
        others = self.queued_prompt_tokens - self.in_flight_prompt_tokens_at_heartbeat
        return self.in_flight_prompt_tokens + (others if others > 0 else 0)

    @cached_property
    def kv_tokens_in_use(self) -> float:
        """KV held by its running sequences, in tokens (the decode load)."""
        return self.kv_usage * self.kv_capacity_tokens


@dataclass(frozen=True)
class LoadView:
    """Replicas per pool, each sorted by replica id (so every policy sees one order)."""

    prefill: tuple[ReplicaLoad, ...] = ()
    decode: tuple[ReplicaLoad, ...] = ()

    def __post_init__(self) -> None:
        for pool, replicas in (("prefill", self.prefill), ("decode", self.decode)):
            ids = [r.replica_id for r in replicas]
            # Strictly increasing: sorted and distinct (one pass, on every placement).
            if not all(map(str.__lt__, ids, ids[1:])):
                raise ValueError(f"LoadView.{pool} must hold distinct replicas sorted by id")

    def pool(self, role: str) -> tuple[ReplicaLoad, ...]:
        if role not in POOLS:
            raise ValueError(f"role must be one of {POOLS}, got {role!r}")
        return getattr(self, role)

    def replica_ids(self) -> list[str]:
        """Every replica of either pool, once, sorted."""
        return sorted({r.replica_id for r in self.prefill} | {r.replica_id for r in self.decode})

    def imbalance(self, role: str) -> int:
        """Outstanding requests of the busiest replica of the pool minus the idlest's."""
        counts = [r.outstanding for r in self.pool(role)]
        return max(counts) - min(counts) if counts else 0

    @classmethod
    def from_workers(
        cls,
        workers: Iterable[WorkerRecord],
        in_flight: Mapping[str, int] | None = None,
        in_flight_prompt_tokens: Mapping[str, int] | None = None,
        memo: ReplicaMemo | None = None,
        *,
        delta: bool = False,
    ) -> LoadView:
        """Join registry records with this ingress's in-flight figures (InFlight).

        A worker of role "both" joins both pools. Replicas with in-flight requests but no
        record (expired, or not registered yet) are left out: placement only picks what
        the registry says is alive.

        memo: kept by the caller across calls (one per ingress) to reuse a replica's entry
        while its record is the same object and its in-flight figures are unchanged,
        which between two registry polls is every replica but the ones the last requests
        went to. Records must not change in place (WorkerInfo is frozen).
        delta: join by the delta rule (module docstring); needs the memo, which remembers
        this ingress's in-flight figures when each record was first seen.
        """
        if delta and memo is None:
            raise ValueError("LoadView.from_workers: delta=True needs a memo")
        in_flight = in_flight or {}
        in_flight_prompt_tokens = in_flight_prompt_tokens or {}
        prefill: dict[str, ReplicaLoad] = {}
        decode: dict[str, ReplicaLoad] = {}
        seen = 0
        for worker in workers:
            rid = worker.replica_id
            figures = (in_flight.get(rid, 0), in_flight_prompt_tokens.get(rid, 0))
            known = memo.get(rid) if memo is not None else None
            if known is not None and known[0] is worker and known[1] == figures:
                entry = known[2]
            else:
                # The figures when this record was first seen (a new heartbeat).
                seen_at = known[3] if known is not None and known[0] is worker else figures
                entry = _replica_load(worker, *figures, seen_at if delta else None)
                if memo is not None:
                    memo[rid] = (worker, figures, entry, seen_at)
            seen += 1
            role = worker.role
            if role == "prefill" or role == "both":
                prefill[rid] = entry
            if role == "decode" or role == "both":
                decode[rid] = entry
        if memo is not None and len(memo) > 2 * seen:
            # Replicas gone from the registry: forget them (rarely: not on every call).
            for rid in [rid for rid in memo if rid not in prefill and rid not in decode]:
                del memo[rid]
        return cls(
            prefill=tuple([prefill[rid] for rid in sorted(prefill)]),
            decode=tuple([decode[rid] for rid in sorted(decode)]),
        )


ReplicaMemo = dict[
    str, tuple[WorkerRecord, tuple[int, int], ReplicaLoad, tuple[int, int]]
]
"""LoadView.from_workers' memo: replica id -> (its record, its in-flight figures, entry,
the in-flight figures when that record was first seen)."""


def _replica_load(
    worker: WorkerRecord,
    in_flight: int,
    in_flight_prompt_tokens: int,
    at_heartbeat: tuple[int, int] | None = None,
) -> ReplicaLoad:
    return ReplicaLoad(
        replica_id=worker.replica_id,
        running=worker.load.running,
        waiting=worker.load.waiting,
        queued_prompt_tokens=worker.load.queued_prompt_tokens,
        kv_usage=worker.load.kv_usage,
        in_flight=in_flight,
        in_flight_prompt_tokens=in_flight_prompt_tokens,
        max_num_seqs=worker.capacity.max_num_seqs,
        # Groups are ordered full attention first (GptOssConfig.kv_groups).
        kv_capacity_tokens=worker.capacity.kv_blocks[0] * worker.capacity.block_size,
        in_flight_at_heartbeat=at_heartbeat[0] if at_heartbeat is not None else None,
        in_flight_prompt_tokens_at_heartbeat=(
            at_heartbeat[1] if at_heartbeat is not None else None
        ),
    )


class InFlight:
    """Requests this ingress has placed on each replica and not yet seen finish, and the
    prompt tokens it left each replica to compute and not yet seen computed.

        start(r, prompt_tokens=n)  ->  prefilled(r, n) at the first token  ->  finish(r)

    Used from one asyncio event loop only (the ingress), so plain ints need no lock.
    """

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._prompt_tokens: Counter[str] = Counter()

    def start(self, replica_id: str, prompt_tokens: int = 0) -> None:
        if prompt_tokens < 0:
            raise ValueError(f"InFlight.start: prompt_tokens must be >= 0, got {prompt_tokens}")
        self._counts[replica_id] += 1
        if prompt_tokens:
            self._prompt_tokens[replica_id] += prompt_tokens

    def prefilled(self, replica_id: str, prompt_tokens: int) -> None:
        """The `prompt_tokens` given to `start` are computed (or will never be)."""
        if not 0 <= prompt_tokens <= self._prompt_tokens[replica_id]:
            raise ValueError(
                f"InFlight.prefilled({replica_id!r}, {prompt_tokens}): only "
                f"{self._prompt_tokens[replica_id]} prompt tokens were started there"
            )
        self._prompt_tokens[replica_id] -= prompt_tokens
        if not self._prompt_tokens[replica_id]:
            del self._prompt_tokens[replica_id]

    def finish(self, replica_id: str) -> None:
        if self._counts[replica_id] <= 0:
            raise ValueError(f"InFlight.finish({replica_id!r}) without a matching start")
        self._counts[replica_id] -= 1
        if not self._counts[replica_id]:
            del self._counts[replica_id]

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def prompt_tokens(self) -> dict[str, int]:
        return dict(self._prompt_tokens)

    def total(self) -> int:
        return sum(self._counts.values())
