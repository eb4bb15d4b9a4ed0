"""Placement on realistic workloads: a discrete-event simulation of a decode pool that
drives the project's own placement code.

    .venv/bin/python -m bench.router_sim [--quick] [--workloads chat,agentic,rag,no_reuse]
        [--pools 4,8,16] [--caches tight,scarce,medium,ample] [--loads 0.8] [--seeds 0,1,2]
        [--routers ...] [--jobs 2] [--json out.json]

What is real and what is modelled:

    real   the router `prefix_aware` is the ingress's own IngressPlacement
           (cluster/placement.py, make_ingress): PrefixAware with deploy/serve-config.yaml's
           decode weights (unless --prefix-aware overrides them), LoadView.from_workers
           joining heartbeat records with its InFlight figures, its hash cache, its pending
           prefixes, place() and release(); a PrefixIndex fed only by the BlockPools'
           stored/removed events (after --event-lag-s), one BlockPool per replica (LRU free
           queue, ref counts, hash map), the engine's chained block hashes
           (tandem.workers.kv.block_hash) over the workloads' token ids (cluster/workloads.py).
           replay_decision makes a decision an ingress logged again from its inputs
           (tests/test_router_cluster.py checks a cluster's decisions against it).
    model  each replica: a FIFO prefill queue computing the uncached part of each prompt at
           a fixed rate; a request is admitted (its cached prefix touched, its blocks
           allocated for prompt + answer) when it reaches the head of the queue, a decode
           slot is free and the pool has the blocks, else it waits; then decode at a fixed
           time per token; at the end the prompt's and answer's full blocks stay cached (the
           next turn reuses the answer) and the blocks are freed, tail first (as the engine
           frees them). Heartbeats: every --heartbeat-s, phases staggered.

Load: a calibration run of the clairvoyant router (at the rate where the unique prompt
work, tokens in blocks nothing computed before, is half the pool's prefill rate) measures
the share of prompt tokens it computes, a second one at the rate that gives, as long as
the cell, measures it again; the session rate is then set so that the clairvoyant
router's prefill would be `load` busy, and every router serves that trace (sessions keep
ramping up past the warm-up, so at small caches this overshoots: bench/RESULTS.md).
Cache sizes are fractions of the working set (time-average of the tokens of live content:
a conversation from its start to its last turn, a document from its first to its last
use, at nominal times), per replica: tight 0.25, scarce 0.5, medium 1, ample 4.

Routers: round_robin, least_loaded and prefix_aware (the project's policies through place());
prefix_aware_v0 (the placement before issue 20: kv_weight 0.05, max_imbalance 8, the max
join of heartbeats and in-flight figures); clairvoyant (true caches and queues: among the
replicas within 8 requests of the least outstanding, the longest truly cached prefix,
then the smallest predicted TTFT);
ray (a model of Ray Serve's PrefixCacheAffinityRouter, its documented defaults: an
approximate per-replica prefix tree of what it routed, the best match when the queue
lengths differ by less than 10 and the match rate is >= 0.1, else the replica with the
smallest tree; power of two choices when imbalanced); sglang (a model of the SGLang
router's cache_aware policy, its defaults: approximate tree, shortest queue when
max - min > 32 and max > 1.0001 min, else the best match when its rate > 0.5, else the
smallest tree). Both models count requests the router itself has outstanding (fresh) and
never learn of evictions (their trees are not bounded by default).

Reported per cell (measured requests: those arriving after the warm-up): prefix hit rate
(cached / prompt tokens at admission), TTFT p50 / p99, requests, and for the index-driven
routers the share of index-reported cached tokens evicted before admission.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import yaml

from tandem.cluster.index_feeder import PrefixIndexFeeder
from tandem.cluster.placement import IngressPlacement, PlacementConfig, decision_from_state
from tandem.cluster.workloads import SessionSpec, Workload, make_workload, synthetic_answer
from tandem.router.load import InFlight, LoadView
from tandem.router.policies import (
    DisaggRule,
    LeastLoaded,
    Placement,
    PlacementPolicy,
    PrefixAware,
    PrefixAwareConfig,
    RoundRobin,
    place,
)
from tandem.router.prefix_index import FULL, PrefixIndex, usable_blocks
from tandem.workers.control_plane import KVEventReader
from tandem.workers.kv.block_hash import hash_prompt_blocks
from tandem.workers.kv.block_pool import BlockPool, BlockRemoved, BlockStored, KVBlock

CACHE_FRACTIONS = {"tight": 0.25, "scarce": 0.5, "medium": 1.0, "ample": 4.0}
SERVE_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "serve-config.yaml"
# Token ids below 256 are CPython's shared small ints: a trace of millions of tokens then
# costs a pointer a token. Content never collides (16-token blocks of 256 symbols).
SIM_VOCAB = 256


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 8
    block_size: int = 16
    prefill_tokens_per_s: float = 4000.0
    # One replica's prefill rate (uncached prompt tokens a second).
    prefill_overhead_s: float = 0.01
    # Per prefill, whatever its length (scheduling, the first decode step).
    tpot_s: float = 0.02
    # Decode time per output token, per sequence (slots decode in parallel).
    max_num_seqs: int = 64
    cache_tokens: int = 65536
    # KV tokens per replica (the block pool).
    heartbeat_s: float = 1.0
    event_lag_s: float = 0.02
    # Block events reach the router's index this long after the pool emits them.
    registry_lag_s: float = 0.25
    # A heartbeat reaches the ingress this long after it was taken (half a registry poll).
    local_prefill_threshold: int = 32

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.block_size < 1 or self.max_num_seqs < 1:
            raise ValueError("SimConfig: replicas, block_size and max_num_seqs must be >= 1")
        for name in ("prefill_tokens_per_s", "tpot_s", "heartbeat_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SimConfig.{name} must be > 0")
        if self.cache_tokens < 4 * self.block_size:
            raise ValueError(f"SimConfig.cache_tokens too small: {self.cache_tokens}")

    @property
    def cache_blocks(self) -> int:
        return self.cache_tokens // self.block_size


def shipped_prefix_aware() -> PrefixAwareConfig:
    """deploy/serve-config.yaml's decode-pool PrefixAware weights (this pool decodes)."""
    app = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]
    return PrefixAwareConfig(**app["placement"]["prefix_aware"]["decode"])


# ----------------------------------------------------------------------------- traces


@dataclass
class SessionTrace:
    """A session's token ids and block hashes, computed once and replayed per router."""

    spec: SessionSpec
    tokens: list[list[int]]
    # Per request: the token list its prompt and answer are prefixes of (a session that
    # keeps its history shares one list across requests).
    prompt_len: list[int]
    seq_len: list[int]
    # Prompt length and prompt + answer length of each request.
    chains: list[list[bytes]]
    # Per request: block hashes of the full blocks of tokens[:seq_len] (shared list when
    # the history is kept: later requests' chains extend earlier ones).


def build_trace(spec: SessionSpec, block_size: int) -> SessionTrace:
    tokens, prompt_len, seq_len, lists = [], [], [], []
    history: tuple[int, ...] = ()
    for k, step in enumerate(spec.steps):
        prompt = spec.prompt(k, history)
        answer = synthetic_answer(spec.session_id, k, step.output_tokens, SIM_VOCAB)
        history = prompt + answer
        prompt_len.append(len(prompt))
        seq_len.append(len(history))
        lists.append(history)
    if spec.keep_history:
        full = list(lists[-1])
        chain = hash_prompt_blocks(full, block_size)
        tokens = [full] * len(lists)
        chains = [chain] * len(lists)
    else:
        tokens = [list(seq) for seq in lists]
        chains = [hash_prompt_blocks(seq, block_size) for seq in tokens]
    return SessionTrace(spec, tokens, prompt_len, seq_len, chains)


@dataclass
class Trace:
    sessions: list[SessionTrace]
    working_set_tokens: float
    unique_tokens_per_s: float
    duration_s: float


def nominal_step_times(
    spec: SessionSpec, st: SessionTrace, config: SimConfig
) -> list[tuple[float, float]]:
    """(arrival, end) of each request with no queueing anywhere."""
    out, t = [], spec.start_s
    for k, step in enumerate(spec.steps):
        t += step.think_s
        end = (
            t + st.prompt_len[k] / config.prefill_tokens_per_s + step.output_tokens * config.tpot_s
        )
        out.append((t, end))
        t = end
    return out


def measure_trace(sessions: list[SessionTrace], config: SimConfig, duration_s: float) -> Trace:
    """Working set and unique prompt work of a trace, at nominal times."""
    bs = config.block_size
    first: dict[bytes, float] = {}
    last: dict[bytes, float] = {}
    events = []
    for st in sessions:
        times = nominal_step_times(st.spec, st, config)
        for k, (arrival, end) in enumerate(times):
            events.append((arrival, end, st, k))
    events.sort(key=lambda e: e[0])
    unique = 0
    for arrival, end, st, k in events:
        chain = st.chains[k]
        n_prompt = st.prompt_len[k] // bs
        n_seq = st.seq_len[k] // bs
        seen = 0
        for i in range(min(n_prompt, len(chain))):
            if chain[i] in first:
                seen += 1
            else:
                break
        unique += st.prompt_len[k] - seen * bs
        for i in range(min(n_seq, len(chain))):
            h = chain[i]
            if h not in first:
                first[h] = arrival
            last[h] = end
    live = sum(last[h] - first[h] for h in first) * bs
    return Trace(sessions, live / duration_s, unique / duration_s, duration_s)


@lru_cache(maxsize=4)
def calibrate(workload_name: str, seed: int, config_key: tuple) -> tuple[float, ...]:
    """Per session started: (unique prompt tokens, working-set token-seconds, requests,
    prompt tokens), measured on a long trace at rate 1 (all scale with the rate)."""
    config = SimConfig(**dict(config_key))
    workload = make_workload(workload_name, vocab_size=SIM_VOCAB, seed=10_000 + seed)
    duration = 400.0 if workload_name != "no_reuse" else 100.0
    specs = workload.with_rate(1.0).sessions(duration)
    sessions = [build_trace(s, config.block_size) for s in specs]
    trace = measure_trace(sessions, config, duration)
    n = len(sessions)
    requests = sum(len(st.prompt_len) for st in sessions) / n
    prompt = sum(sum(st.prompt_len) for st in sessions) / n
    return (
        trace.unique_tokens_per_s * duration / n,
        trace.working_set_tokens * duration / n,
        requests,
        prompt,
    )


# ----------------------------------------------------------------------------- the pool


@dataclass(frozen=True)
class SimCapacity:
    max_num_seqs: int
    kv_blocks: tuple[int, ...]
    block_size: int


@dataclass(frozen=True)
class SimLoad:
    running: int
    waiting: int
    queued_prompt_tokens: int
    kv_usage: float


@dataclass(frozen=True)
class SimRecord:
    """A registry record as LoadView.from_workers reads it."""

    replica_id: str
    role: str
    capacity: SimCapacity
    load: SimLoad


@dataclass
class Job:
    st: SessionTrace
    k: int
    arrival: float
    replica: int = -1
    est_cached: int = 0
    # Prompt tokens the router's index said the chosen replica held.
    true_uncached_at_place: int = 0
    cached: int = 0
    # Prompt tokens reused at admission.
    blocks: list[KVBlock] = field(default_factory=list)
    ttft: float = 0.0
    in_flight_tokens: int = 0
    placement: Placement | None = None
    # The ingress's placement (IngressRouter), released when the job ends.

    @property
    def prompt_len(self) -> int:
        return self.st.prompt_len[self.k]


class Replica:
    def __init__(self, rid: str, config: SimConfig) -> None:
        self.rid = rid
        self.config = config
        self.pool = BlockPool(config.cache_blocks, config.block_size, FULL)
        self.queue: deque[Job] = deque()
        self.prefilling: Job | None = None
        self.prefill_end = 0.0
        self.decoding = 0
        self.kv_blocked = False
        # The queue's head waits for blocks: retried only once a request frees some.
        self.queued_tokens = 0
        # Uncached prompt tokens of queued jobs (as estimated when they were placed) plus
        # what is left of the current prefill: the heartbeat's queued_prompt_tokens.

    def outstanding(self) -> int:
        return len(self.queue) + (self.prefilling is not None) + self.decoding

    def record(self, now: float) -> SimRecord:
        running = self.decoding + (self.prefilling is not None)
        return SimRecord(
            self.rid,
            "decode",
            SimCapacity(
                self.config.max_num_seqs, (self.config.cache_blocks,), self.config.block_size
            ),
            SimLoad(running, len(self.queue), self.pending_tokens(now), self.pool.usage),
        )

    def pending_tokens(self, now: float) -> int:
        left = 0
        if self.prefilling is not None:
            left = max(0, int((self.prefill_end - now) * self.config.prefill_tokens_per_s))
        return self.queued_tokens + left

    def hit_blocks(self, job: Job) -> list[KVBlock]:
        """The cached blocks of the job's prompt, as the engine would reuse them."""
        bs = self.config.block_size
        st, k = job.st, job.k
        tokens, chain = st.tokens[k], st.chains[k]
        out = []
        for i in range(usable_blocks(st.prompt_len[k], bs)):
            block = self.pool.get_cached(chain[i], tokens[i * bs : (i + 1) * bs])
            if block is None:
                break
            out.append(block)
        return out


# ----------------------------------------------------------------------------- routers


class Router(ABC):
    name: str
    needs_index = False

    def reset(self, sim: Simulation) -> None:  # noqa: B027 - optional hook
        """Called once before the run."""

    @abstractmethod
    def choose(self, sim: Simulation, job: Job) -> tuple[int, int]:
        """(replica index, prompt tokens it believes that replica holds)."""

    def placed(self, sim: Simulation, job: Job) -> None:  # noqa: B027 - optional hook
        """After the choice (approximate trees insert the prompt here)."""

    def finished(self, sim: Simulation, job: Job) -> None:  # noqa: B027 - optional hook
        """The job ended (an ingress releases its pending prompt here)."""


def make_ingress(
    config: SimConfig,
    prefix_aware: PrefixAwareConfig,
    index: PrefixIndex | None = None,
    pending: bool = True,
) -> IngressPlacement:
    """The ingress placement the simulation runs: PrefixAware with `prefix_aware` in both
    pools, the disaggregation rule, over `index` (the simulation feeds it block events;
    its feeder is never started)."""
    feeder = PrefixIndexFeeder(KVEventReader("redis://127.0.0.1:1", cluster="router-sim"))
    if index is not None:
        feeder.index = index
    return IngressPlacement(
        decode_policy=PrefixAware(prefix_aware),
        prefill_policy=PrefixAware(prefix_aware),
        config=PlacementConfig(
            rule=DisaggRule(config.local_prefill_threshold),
            block_size=config.block_size,
            pending_prefixes=pending,
        ),
        index=feeder,
    )


def replay_decision(ingress: IngressPlacement, entry: Mapping) -> Placement:
    """A decision an ingress logged (IngressPlacement.state()'s recent_decisions) made
    again by the simulation's placement, from the same inputs: the load view and the
    cached tokens per replica (tests/test_router_cluster.py replays a cluster's)."""
    view, num_prompt_tokens, cached, _ = decision_from_state(entry)
    return place(
        view,
        num_prompt_tokens,
        decode_policy=ingress.decode_policy,
        prefill_policy=ingress.prefill_policy,
        rule=ingress.config.rule,
        cached_tokens=cached,
    )


class IngressRouter(Router):
    """The ingress's own placement object, cluster/placement.py's IngressPlacement, as
    ClusterBackend drives it: its LoadView join of the registry records with its
    in-flight figures (the simulation counts through its InFlight), the prompt's block
    hashes (its hash cache), the prefix index (fed here by the pools' block events, as
    its feeder would from Redis), its pending prefixes, place() with the policies, and
    release() when a request ends."""

    needs_index = True

    def __init__(self, name: str, config: PrefixAwareConfig, pending: bool = True) -> None:
        self.name = name
        self.config = config
        self.pending = pending
        self.decisions: Counter[str] = Counter()
        self.decision_s: list[float] = []
        # Wall time of each IngressPlacement.place() call (hashing, index, policies).

    def reset(self, sim: Simulation) -> None:
        self.ingress = make_ingress(sim.config, self.config, sim.index, self.pending)
        sim.in_flight = self.ingress.in_flight

    def choose(self, sim: Simulation, job: Job) -> tuple[int, int]:
        st, k = job.st, job.k
        prompt = st.tokens[k][: st.prompt_len[k]]
        start = time.perf_counter()
        placement = self.ingress.place(prompt, sim.visible_records)
        self.decision_s.append(time.perf_counter() - start)
        job.placement = placement
        self.decisions[placement.decode_reason] += 1
        return sim.index_of[placement.decode], placement.decode_cached_tokens

    def finished(self, sim: Simulation, job: Job) -> None:
        self.ingress.release(job.placement)


class PolicyRouter(Router):
    """One of the project's policies, through place(), the ingress's view of the pool."""

    def __init__(self, name: str, make: callable, needs_index: bool, delta: bool = True) -> None:
        self.name = name
        self.delta = delta
        self._make = make
        self.needs_index = needs_index
        self.decisions: Counter[str] = Counter()

    def reset(self, sim: Simulation) -> None:
        self.policy: PlacementPolicy = self._make()
        self.memo: dict = {}
        self.rule = DisaggRule(sim.config.local_prefill_threshold)

    def choose(self, sim: Simulation, job: Job) -> tuple[int, int]:
        view = LoadView.from_workers(
            sim.visible_records,
            sim.in_flight.counts(),
            sim.in_flight.prompt_tokens(),
            self.memo,
            delta=self.delta,
        )
        cached: dict[str, int] = {}
        if self.needs_index:
            st, k = job.st, job.k
            n = usable_blocks(st.prompt_len[k], sim.config.block_size)
            blocks = sim.index.matched_blocks(st.chains[k][:n], sim.ids)
            cached = {w: b * sim.config.block_size for w, b in blocks.items() if b}
        placement = place(
            view,
            job.prompt_len,
            decode_policy=self.policy,
            prefill_policy=self.policy,
            rule=self.rule,
            cached_tokens=cached,
        )
        self.decisions[placement.decode_reason] += 1
        return sim.index_of[placement.decode], placement.decode_cached_tokens


class Clairvoyant(Router):
    """True caches, true queues: within `max_imbalance` of the least outstanding
    requests, the longest truly cached prefix, then the smallest predicted TTFT."""

    name = "clairvoyant"

    def __init__(self, max_imbalance: int = 8) -> None:
        self.max_imbalance = max_imbalance

    def choose(self, sim: Simulation, job: Job) -> tuple[int, int]:
        st, k = job.st, job.k
        bs = sim.config.block_size
        n = usable_blocks(st.prompt_len[k], bs)
        true_blocks = sim.truth.matched_blocks(st.chains[k][:n], sim.ids)
        outstanding = [r.outstanding() for r in sim.replicas]
        bound = min(outstanding) + self.max_imbalance
        best, best_key = 0, None
        for i, r in enumerate(sim.replicas):
            if outstanding[i] > bound:
                continue
            cached = true_blocks[r.rid] * bs
            ttft = sim.predicted_ttft(r, job.prompt_len - cached)
            key = (-cached, ttft, i)
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best, -best_key[0]


class _ApproximateTree(Router):
    """The prompts it routed, per replica, as block hashes (a radix tree over whole
    blocks; the real routers keep characters): never told of evictions."""

    def reset(self, sim: Simulation) -> None:
        self.tree = PrefixIndex()
        self.rng = random.Random(1234)

    def matches(self, sim: Simulation, job: Job) -> tuple[dict[str, int], int]:
        st, k = job.st, job.k
        n = usable_blocks(st.prompt_len[k], sim.config.block_size)
        return self.tree.matched_blocks(st.chains[k][:n], sim.ids), max(n, 1)

    def placed(self, sim: Simulation, job: Job) -> None:
        st, k = job.st, job.k
        rid = sim.replicas[job.replica].rid
        for h in st.chains[k][: st.prompt_len[k] // sim.config.block_size]:
            self.tree.stored(rid, FULL, h)

    def tree_size(self, rid: str) -> int:
        return self.tree.num_blocks(rid)


class RayStyle(_ApproximateTree):
    """Ray Serve PrefixCacheAffinityRouter's policy, as its docstring and defaults describe
    it (imbalanced_threshold 10, match_rate_threshold 0.1, no eviction)."""

    name = "ray"

    def __init__(self, imbalanced_threshold: int = 10, match_rate_threshold: float = 0.1):
        self.imbalanced_threshold = imbalanced_threshold
        self.match_rate_threshold = match_rate_threshold

    def choose(self, sim: Simulation, job: Job) -> tuple[int, int]:
        queue = [r.outstanding() for r in sim.replicas]
        n = len(queue)
        if max(queue) - min(queue) >= self.imbalanced_threshold:
            a, b = self.rng.sample(range(n), 2) if n > 1 else (0, 0)
            return (a if queue[a] <= queue[b] else b), 0
        matched, blocks = self.matches(sim, job)
        best = max(matched.values())
        if best / blocks >= self.match_rate_threshold:
            cands = [i for i, r in enumerate(sim.replicas) if matched[r.rid] == best]
        else:
            sizes = [self.tree_size(r.rid) for r in sim.replicas]
            cands = [i for i in range(n) if sizes[i] == min(sizes)]
        # Among candidates, power of two choices on queue length.
        if len(cands) > 1:
            a, b = self.rng.sample(cands, 2)
            choice = a if queue[a] <= queue[b] else b
        else:
            choice = cands[0]
        return choice, 0


class SGLangStyle(_ApproximateTree):
    """The SGLang router's cache_aware policy with its defaults (cache_threshold 0.5,
    balance_abs_threshold 32, balance_rel_threshold 1.0001, trees effectively unbounded)."""

    name = "sglang"

    def __init__(
        self, cache_threshold: float = 0.5, abs_threshold: int = 32, rel_threshold: float = 1.0001
    ):
        self.cache_threshold = cache_threshold
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold

    def choose(self, sim: Simulation, job: Job) -> tuple[int, int]:
        load = [r.outstanding() for r in sim.replicas]
        lo, hi = min(load), max(load)
        if hi - lo > self.abs_threshold and hi > self.rel_threshold * lo:
            return load.index(lo), 0
        matched, blocks = self.matches(sim, job)
        best = max(matched.values())
        if best / blocks > self.cache_threshold:
            # The first replica with the highest match (the tree walk's order).
            return next(i for i, r in enumerate(sim.replicas) if matched[r.rid] == best), 0
        sizes = [self.tree_size(r.rid) for r in sim.replicas]
        return sizes.index(min(sizes)), 0


def make_router(name: str, prefix_aware: PrefixAwareConfig) -> Router:
    if name == "round_robin":
        return PolicyRouter(name, RoundRobin, needs_index=False)
    if name == "least_loaded":
        return PolicyRouter(name, LeastLoaded, needs_index=False)
    if name == "prefix_aware":
        return IngressRouter(name, prefix_aware)
    if name == "prefix_aware_no_pending":
        return IngressRouter(name, prefix_aware, pending=False)
    if name == "prefix_aware_v0":
        # The placement shipped before this benchmark (commit f0fb9be): decode weights
        # kv_weight 0.05, max_imbalance 8, heartbeat and in-flight joined by the max.
        v0 = PrefixAwareConfig(kv_weight=0.05, max_imbalance=8)
        return PolicyRouter(name, lambda: PrefixAware(v0), needs_index=True, delta=False)
    if name == "clairvoyant":
        return Clairvoyant()
    if name == "ray":
        return RayStyle()
    if name == "sglang":
        return SGLangStyle()
    raise ValueError(f"unknown router {name!r}")


ROUTERS = ("round_robin", "least_loaded", "prefix_aware", "clairvoyant", "ray", "sglang")


# ----------------------------------------------------------------------------- simulation

_ARRIVE, _PREFILLED, _FINISH, _HEARTBEAT, _SEEN, _EVENTS = range(6)


class Simulation:
    def __init__(self, config: SimConfig, trace: Trace, router: Router, warmup_s: float):
        self.config = config
        self.trace = trace
        self.router = router
        self.warmup_s = warmup_s
        self.replicas = [Replica(f"d{i:02d}", config) for i in range(config.replicas)]
        self.ids = [r.rid for r in self.replicas]
        self.index_of = {r.rid: i for i, r in enumerate(self.replicas)}
        self.index = PrefixIndex()  # the router's, fed after event_lag_s
        self.truth = PrefixIndex()  # fed at once: the caches as they are
        self.in_flight = InFlight()
        self.visible_records = [r.record(0.0) for r in self.replicas]
        # The registry records as the ingress has read them (heartbeat + registry poll).
        self._heap: list = []
        self._seq = 0
        self.now = 0.0
        self.done: list[Job] = []

    # -- events

    def _push(self, t: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def run(self) -> list[Job]:
        self.router.reset(self)
        for st in self.trace.sessions:
            first = st.spec.steps[0]
            self._push(st.spec.start_s + first.think_s, _ARRIVE, Job(st, 0, 0.0))
        n = self.config.replicas
        for i in range(n):
            self._push(self.config.heartbeat_s * (i + 1) / n, _HEARTBEAT, i)
        end = self.trace.duration_s
        while self._heap:
            t, _, kind, payload = heapq.heappop(self._heap)
            self.now = t
            if kind == _ARRIVE:
                payload.arrival = t
                self._arrive(payload)
            elif kind == _PREFILLED:
                self._prefilled(*payload)
            elif kind == _FINISH:
                self._finish(*payload)
            elif kind == _HEARTBEAT:
                self._push(
                    t + self.config.registry_lag_s,
                    _SEEN,
                    (payload, self.replicas[payload].record(t)),
                )
                if t < end:
                    self._push(t + self.config.heartbeat_s, _HEARTBEAT, payload)
            elif kind == _SEEN:
                self.visible_records[payload[0]] = payload[1]
            else:
                self._apply(*payload)
        self.check()
        return self.done

    def check(self) -> None:
        """After a run: every request finished and freed its blocks, the pools are
        consistent, and the router's index (fed only by block events) equals the caches."""
        sessions = self.trace.sessions
        if len(self.done) != sum(len(st.spec.steps) for st in sessions):
            raise AssertionError("router_sim: not every request finished")
        if self.in_flight.total():
            raise AssertionError("router_sim: in-flight counts left after the run")
        for r in self.replicas:
            r.pool.check_integrity()
            if r.pool.num_free != r.pool.num_blocks or r.queue or r.decoding:
                raise AssertionError(f"router_sim: {r.rid} still holds requests or blocks")
            cached = {(FULL, b.block_hash) for b in r.pool.cached_blocks()}
            if self.index.blocks(r.rid) != cached or self.truth.blocks(r.rid) != cached:
                raise AssertionError(f"router_sim: the index of {r.rid} differs from its cache")

    def _arrive(self, job: Job) -> None:
        i, est = self.router.choose(self, job)
        job.replica = i
        job.est_cached = est
        r = self.replicas[i]
        self.router.placed(self, job)
        uncached = max(0, job.prompt_len - est)
        job.in_flight_tokens = uncached
        self.in_flight.start(r.rid, uncached)
        r.queue.append(job)
        r.queued_tokens += uncached
        self._try_start(r)

    def predicted_ttft(self, r: Replica, uncached: int) -> float:
        """Queue ahead plus this prompt's prefill (the clairvoyant router's estimate)."""
        c = self.config
        work = r.pending_tokens(self.now) + uncached
        waits = len(r.queue) + 1
        return work / c.prefill_tokens_per_s + waits * c.prefill_overhead_s

    def _try_start(self, r: Replica) -> None:
        c = self.config
        if r.prefilling is not None or not r.queue or r.kv_blocked:
            return
        if r.decoding + 1 > c.max_num_seqs:
            return
        job = r.queue[0]
        hits = r.hit_blocks(job)
        total = -(-job.st.seq_len[job.k] // c.block_size)
        need = total - len(hits)
        free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if need > r.pool.num_free - free_hits:
            if r.decoding == 0 and need > c.cache_blocks - len(hits):
                raise RuntimeError(f"a request of {total} blocks cannot fit {c.cache_blocks}")
            r.kv_blocked = True  # waits for a finishing request to free blocks
            return
        r.queue.popleft()
        r.queued_tokens -= job.in_flight_tokens
        r.pool.touch(hits)
        job.blocks = hits + r.pool.allocate(need)
        job.cached = len(hits) * c.block_size
        uncached = job.prompt_len - job.cached
        r.prefilling = job
        r.prefill_end = self.now + uncached / c.prefill_tokens_per_s + c.prefill_overhead_s
        self._push(r.prefill_end, _PREFILLED, (r, job))
        self._flush(r)

    def _cache(self, r: Replica, job: Job, start: int, stop: int) -> None:
        bs = self.config.block_size
        tokens, chain = job.st.tokens[job.k], job.st.chains[job.k]
        for i in range(start, stop):
            block = job.blocks[i]
            if block.block_hash is None:
                r.pool.cache_full_block(
                    block, chain[i], tokens[i * bs : (i + 1) * bs], chain[i - 1] if i else None
                )

    def _prefilled(self, r: Replica, job: Job) -> None:
        job.ttft = self.now - job.arrival
        self.in_flight.prefilled(r.rid, job.in_flight_tokens)
        self._cache(
            r, job, job.cached // self.config.block_size, job.prompt_len // self.config.block_size
        )
        r.prefilling = None
        r.decoding += 1
        self._push(
            self.now + job.st.spec.steps[job.k].output_tokens * self.config.tpot_s,
            _FINISH,
            (r, job),
        )
        self._flush(r)
        self._try_start(r)

    def _finish(self, r: Replica, job: Job) -> None:
        bs = self.config.block_size
        self._cache(r, job, job.prompt_len // bs, job.st.seq_len[job.k] // bs)
        r.pool.free(reversed(job.blocks))
        r.kv_blocked = False
        job.blocks = []
        r.decoding -= 1
        self.in_flight.finish(r.rid)
        self.router.finished(self, job)
        self.done.append(job)
        self._flush(r)
        st, k = job.st, job.k + 1
        if k < len(st.spec.steps):
            self._push(self.now + st.spec.steps[k].think_s, _ARRIVE, Job(st, k, 0.0))
        self._try_start(r)

    def _flush(self, r: Replica) -> None:
        events = r.pool.drain_events()
        if events:
            self._apply_to(self.truth, r.rid, events)
            self._push(self.now + self.config.event_lag_s, _EVENTS, (r.rid, events))

    def _apply(self, rid: str, events) -> None:
        self._apply_to(self.index, rid, events)

    @staticmethod
    def _apply_to(index: PrefixIndex, rid: str, events) -> None:
        for e in events:
            if type(e) is BlockStored:
                index.stored(rid, e.group, e.block_hash)
            elif type(e) is BlockRemoved:
                index.removed(rid, e.group, e.block_hash)


# ----------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One workload, pool, cache and load, on one seed: every router on the same trace."""

    workload: str
    replicas: int
    cache: str
    load: float
    seed: int
    routers: tuple[str, ...]
    measured_requests: int = 5000
    # The measured window is long enough for about this many requests (at least 20 s).
    warmup_s: float = 45.0
    prefix_aware: tuple = ()
    # PrefixAwareConfig fields overriding the shipped ones (for sweeps).


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


@lru_cache(maxsize=1)
def _trace(workload_name: str, seed: int, rate: float, duration: float, block_size: int) -> Trace:
    """A cell's trace, built once for all its routers (a run only reads it)."""
    workload: Workload = make_workload(workload_name, vocab_size=SIM_VOCAB, seed=seed)
    specs = workload.with_rate(rate).sessions(duration)
    return Trace([build_trace(s, block_size) for s in specs], 0.0, 0.0, duration)


def _simulate(
    cell: Cell,
    router: Router,
    rate: float,
    fraction: float,
    duration: float,
    warmup_s: float,
    per_session: tuple[float, float, float],
) -> dict:
    base = SimConfig(replicas=cell.replicas)
    cache_tokens = max(int(fraction * per_session[1] * rate / cell.replicas), 16384)
    config = replace(base, cache_tokens=cache_tokens)
    trace = _trace(cell.workload, cell.seed, rate, duration, config.block_size)
    start = time.perf_counter()
    done = Simulation(config, trace, router, warmup_s).run()
    wall = time.perf_counter() - start
    measured = [j for j in done if warmup_s <= j.arrival < duration]
    prompt = sum(j.prompt_len for j in measured)
    est = sum(j.est_cached for j in measured)
    lost = sum(max(0, j.est_cached - j.cached) for j in measured)
    ttft = [j.ttft for j in measured]
    out = {
        "router": router.name,
        "requests": len(measured),
        "hit_rate": sum(j.cached for j in measured) / prompt if prompt else 0.0,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_mean_s": statistics.fmean(ttft) if ttft else float("nan"),
        "evicted_share": lost / est if est else 0.0,
        "cache_tokens": cache_tokens,
        "session_rate": rate,
        "wall_s": wall,
    }
    if isinstance(router, PolicyRouter | IngressRouter):
        out["decisions"] = dict(router.decisions)
    if isinstance(router, IngressRouter):
        out["decision_p50_ms"] = 1e3 * percentile(router.decision_s, 50)
        out["decision_p99_ms"] = 1e3 * percentile(router.decision_s, 99)
    return out


def run_cell(cell: Cell) -> list[dict]:
    """Every router of the cell on one trace. Load: the session rate at which the
    clairvoyant router's prefill would be `load` busy, found by two calibration runs of
    the clairvoyant router (the first at the rate where the unique prompt work is half
    the pool's prefill rate, the second at the rate the first gives, after the cell's
    warm-up); caches: the cell's fraction of the working set at that rate."""
    base = SimConfig(replicas=cell.replicas)
    key = tuple(sorted(asdict(replace(base, replicas=1, cache_tokens=65536)).items()))
    per_session = calibrate(cell.workload, cell.seed, key)
    fraction = CACHE_FRACTIONS[cell.cache]
    capacity = cell.replicas * base.prefill_tokens_per_s
    prefix_aware = replace(shipped_prefix_aware(), **dict(cell.prefix_aware))
    # Calibration: the clairvoyant router's share of prompt tokens computed.
    rate0 = 0.5 * capacity / per_session[0]
    probe = _simulate(
        cell,
        Clairvoyant(),
        rate0,
        fraction,
        30.0 + min(60.0, 1500 / (rate0 * per_session[2])),
        30.0,
        per_session,
    )
    computed = max(0.02, 1.0 - probe["hit_rate"])
    rate = cell.load * capacity / (per_session[3] * computed)
    # Again at that rate, as long as the cell runs: a short run at another rate
    # over-estimates the hit rate (caches not yet full, sessions still ramping up), which
    # put whole cells past saturation for every router, the clairvoyant one included.
    measured_s = max(20.0, cell.measured_requests / (rate * per_session[2]))
    probe = _simulate(
        cell, Clairvoyant(), rate, fraction, cell.warmup_s + measured_s, cell.warmup_s, per_session
    )
    computed = max(0.02, 1.0 - probe["hit_rate"])
    rate = cell.load * capacity / (per_session[3] * computed)
    measured_s = max(20.0, cell.measured_requests / (rate * per_session[2]))
    duration = cell.warmup_s + measured_s
    rows = []
    for name in cell.routers:
        row = _simulate(
            cell,
            make_router(name, prefix_aware),
            rate,
            fraction,
            duration,
            cell.warmup_s,
            per_session,
        )
        rows.append(
            {
                **{k: v for k, v in asdict(cell).items() if k != "routers"},
                "calibration_hit_rate": probe["hit_rate"],
                **row,
            }
        )
    return rows


# ----------------------------------------------------------------------------- main


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summarise(rows: list[dict]) -> list[dict]:
    """Median over seeds per (workload, replicas, cache, load, router)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(
            (r["workload"], r["replicas"], r["cache"], r["load"], r["router"]), []
        ).append(r)
    out = []
    for key, rs in sorted(groups.items()):
        out.append(
            {
                "workload": key[0],
                "replicas": key[1],
                "cache": key[2],
                "load": key[3],
                "router": key[4],
                "seeds": len(rs),
                "requests": min(r["requests"] for r in rs),
                "hit_rate": statistics.median(r["hit_rate"] for r in rs),
                "ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in rs),
                "ttft_p99_s": statistics.median(r["ttft_p99_s"] for r in rs),
                "evicted_share": statistics.median(r["evicted_share"] for r in rs),
            }
        )
    return out


def print_tables(summary: list[dict], routers: Sequence[str]) -> None:
    cells: dict[tuple, dict[str, dict]] = {}
    for r in summary:
        cells.setdefault((r["workload"], r["replicas"], r["cache"], r["load"]), {})[r["router"]] = r
    head = " | ".join(routers)
    print(f"\n| workload | pool | cache | load | hit rate: {head} | PA/clairvoyant |")
    print("|---|---:|---|---:|" + "---|" * len(routers) + "---:|")
    for key, by in cells.items():
        vals = " | ".join(f"{by[r]['hit_rate']:.3f}" if r in by else "-" for r in routers)
        ratio = "-"
        if "prefix_aware" in by and "clairvoyant" in by and by["clairvoyant"]["hit_rate"] > 0:
            ratio = f"{by['prefix_aware']['hit_rate'] / by['clairvoyant']['hit_rate']:.3f}"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {vals} | {ratio} |")
    print(f"\n| workload | pool | cache | load | TTFT p99 s: {head} | PA/best practical |")
    print("|---|---:|---|---:|" + "---|" * len(routers) + "---:|")
    practical = ("round_robin", "least_loaded", "ray", "sglang")
    for key, by in cells.items():
        vals = " | ".join(f"{by[r]['ttft_p99_s']:.2f}" if r in by else "-" for r in routers)
        best = [by[r]["ttft_p99_s"] for r in practical if r in by]
        ratio = "-"
        if "prefix_aware" in by and best:
            ratio = f"{by['prefix_aware']['ttft_p99_s'] / min(best):.2f}"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {vals} | {ratio} |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one seed, pool of 4, short runs (tests, smoke)"
    )
    parser.add_argument("--workloads", default="chat,agentic,rag,no_reuse")
    parser.add_argument("--pools", default="4,8,16")
    parser.add_argument("--caches", default="tight,scarce,medium,ample")
    parser.add_argument("--loads", default="0.8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--warmup-s", type=float, default=45.0)
    parser.add_argument(
        "--requests", type=int, default=5000, help="measured requests per run (after the warm-up)"
    )
    parser.add_argument(
        "--prefix-aware",
        default="",
        help="PrefixAwareConfig overrides, e.g. kv_weight=0,max_imbalance=16",
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.quick:
        args.pools, args.seeds, args.warmup_s, args.requests = "4", "0", 20.0, 500
    overrides = []
    for item in filter(None, args.prefix_aware.split(",")):
        k, v = item.split("=")
        overrides.append((k, int(v) if k == "max_imbalance" else float(v)))
    routers = tuple(args.routers.split(","))
    # Seed-major: a run cut short holds whole seeds of the grid.
    cells = [
        Cell(
            w,
            int(p),
            c,
            float(load),
            int(s),
            routers,
            args.requests,
            args.warmup_s,
            tuple(overrides),
        )
        for s in args.seeds.split(",")
        for w in args.workloads.split(",")
        for p in args.pools.split(",")
        for c in (args.caches.split(",") if w != "no_reuse" else ["medium"])
        for load in args.loads.split(",")
    ]
    print(
        f"router_sim: {len(cells)} cells x {len(routers)} routers, machine {platform.machine()} "
        f"({platform.processor() or 'cpu'}), python {sys.version.split()[0]}, "
        f"commit {git_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"shipped prefix_aware (decode): {shipped_prefix_aware()}; overrides {overrides}")
    start = time.perf_counter()
    rows = []

    def progress(cell_rows: list[dict]) -> None:
        rows.extend(cell_rows)
        if args.json:
            # Rewritten after every cell: a run cut short keeps what finished.
            Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
        for row in cell_rows:
            print(
                f"  {row['workload']} x{row['replicas']} {row['cache']} load {row['load']} "
                f"seed {row['seed']} {row['router']}: hit {row['hit_rate']:.3f} "
                f"p99 {row['ttft_p99_s']:.2f} s, {row['requests']} req, {row['wall_s']:.0f} s",
                flush=True,
            )

    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            for future in as_completed([ex.submit(run_cell, c) for c in cells]):
                progress(future.result())
    else:
        for c in cells:
            progress(run_cell(c))
    summary = summarise(rows)
    print_tables(summary, routers)
    print(f"\nwall {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
