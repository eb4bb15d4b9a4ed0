"""Size a GPU cluster before buying it: replay a workload against the autoscaling policy
in a discrete-event simulation of the two pools, with replica speeds measured on GPUs.

    tandem loadtest --simulate --workload mooncake --trace trace.jsonl --out runs/sim
    tandem loadtest --simulate --workload synthetic --isl 1024 --osl 256 \\
        --schedule '600s@2,1200s@2->20,600s@20->2' --out runs/sim

What is simulated (one event heap, seeded, no wall-clock time):

    arrival -> prefill pool: the replica with the fewest queued prompt tokens; FIFO,
               `prefill_tok_s` prompt tokens a second per replica
            -> decode pool: the replica with the fewest requests; up to `max_num_seqs`
               running, the rest wait; a step of b running sequences takes
               step_time(b) (interpolated from measured points) and gives each a token
    TTFT = arrival to the first decode step's end; ITL = the step times after it

Every `control_period_s` each pool's PoolAutoscaler (tandem.cluster.autoscaling, the
code the cluster runs) decides from the same figures the replicas report (queued prompt
tokens and waiting for prefill; running and KV use for decode), Serve's delays applied;
a new replica serves only after `startup_s` (a GPU pod loading its weights), a removed
one finishes its requests first. The same workload then runs on static pools sized at
the autoscaled peak, so the report sets GPU-hours and SLO attainment side by side.

The default speeds are gpt-oss-20b on one H100 from bench/RESULTS.md (prefill 41,823
tok/s at 2k; decode steps of 2.49 ms at batch 1, 10.8 ms at 64, 20.1 ms at 256, the
runner's figures: the whole engine is slower, issue 14 measures by how much). Pass
`--speeds FILE` (JSON of the same fields) for another model or GPU.
"""

from __future__ import annotations

import heapq
import itertools
import json
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tandem.cluster.autoscaling import PoolAutoscaler
from tandem.cluster.loadtest.report import percentile


@dataclass(frozen=True)
class ReplicaSpeed:
    prefill_tok_s: float = 41_823.0
    # (batch, seconds a decode step takes), batch increasing
    decode_steps: tuple[tuple[int, float], ...] = ((1, 0.00249), (64, 0.0108), (256, 0.0201))
    max_num_seqs: int = 256
    gpus_per_replica: int = 1

    def __post_init__(self) -> None:
        if self.prefill_tok_s <= 0 or self.max_num_seqs < 1 or not self.decode_steps:
            raise ValueError("speeds: prefill_tok_s > 0, max_num_seqs >= 1, decode_steps given")
        batches = [b for b, _ in self.decode_steps]
        if batches != sorted(set(batches)) or any(t <= 0 for _, t in self.decode_steps):
            raise ValueError("speeds: decode_steps as increasing batches with positive times")

    @classmethod
    def from_json(cls, path: str | Path) -> ReplicaSpeed:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        steps = tuple((int(b), float(t)) for b, t in data.pop("decode_steps", ()))
        return cls(**data, **({"decode_steps": steps} if steps else {}))

    def step_time(self, batch: int) -> float:
        """Linear between measured batches (log-linear would flatter small batches)."""
        batches = [b for b, _ in self.decode_steps]
        i = bisect_left(batches, batch)
        if i == 0:
            return self.decode_steps[0][1]
        if i == len(batches):  # past the last point: the last slope goes on
            if len(batches) == 1:
                return self.decode_steps[0][1]
            i = len(batches) - 1
        (b0, t0), (b1, t1) = self.decode_steps[i - 1], self.decode_steps[i]
        return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)


@dataclass(frozen=True)
class PoolPlan:
    """One pool's scaling: the policy's targets and Serve's bounds and delays."""

    targets: dict[str, float]
    min_replicas: int = 1
    max_replicas: int = 8
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0


@dataclass(frozen=True)
class SimConfig:
    speed: ReplicaSpeed = ReplicaSpeed()
    # the chart's defaults: a replica at 70% of its prefill rate counts as full
    prefill: PoolPlan = PoolPlan(
        {"queued_prompt_tokens": 16384, "waiting": 8, "prompt_tokens_per_s": 29_000}
    )
    decode: PoolPlan = PoolPlan({"kv_usage": 0.75, "running": 192})
    control_period_s: float = 10.0
    startup_s: float = 60.0
    slo_ttft_s: float = 1.0
    slo_itl_s: float = 0.05


@dataclass
class _Req:
    arrival: float
    isl: int
    osl: int
    first_token: float | None = None
    end: float | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.end is None or self.first_token is None or self.osl < 2:
            return None
        return (self.end - self.first_token) / (self.osl - 1)


@dataclass
class _Replica:
    ready_at: float
    draining: bool = False
    gone_at: float | None = None
    queue: deque = field(default_factory=deque)  # prefill: FIFO; decode: waiting
    queued_tokens: int = 0
    # prefill: (time, prompt tokens) of the arrivals, for prompt_tokens_per_s
    arrived: deque = field(default_factory=deque)
    # decode: the running requests as a heap of (step they finish at, seq, request);
    # every step gives each of them one token
    running: list = field(default_factory=list)
    steps: int = 0
    joined: list[_Req] = field(default_factory=list)
    stepping: bool = False

    def serving(self, t: float) -> bool:
        return self.ready_at <= t and not self.draining

    def idle(self) -> bool:
        return not self.queue and not self.running and not self.stepping


class _Pool:
    def __init__(self, plan: PoolPlan, t0: float, static: int | None) -> None:
        self.plan = plan
        self.policy = PoolAutoscaler(plan.targets)
        n = static if static is not None else plan.min_replicas
        self.replicas = [_Replica(ready_at=t0) for _ in range(n)]
        self.static = static is not None
        self.wish: tuple[int, float] | None = None  # (direction, since)
        self.history: list[tuple[float, int]] = [(t0, n)]

    def live(self, t: float) -> list[_Replica]:
        return [r for r in self.replicas if r.gone_at is None and not r.draining]

    def choose(self, t: float, key) -> _Replica:
        ready = [r for r in self.live(t) if r.ready_at <= t]
        return min(ready or self.live(t), key=key)


class Simulation:
    """One run: `run(requests)` with (arrival_s, isl, osl) rows, `static` replica counts
    (prefill, decode) or None to autoscale."""

    def __init__(self, config: SimConfig, static: tuple[int, int] | None = None) -> None:
        self.config = config
        self.static = static
        self._events: list = []
        self._seq = itertools.count()
        # (gap between tokens, tokens that waited it): inter-token latencies, weighted
        self._gaps: list[tuple[float, int]] = []

    def _at(self, t: float, kind: str, *data) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, data))

    def run(self, rows: Iterable[tuple[float, int, int]]) -> dict:
        c = self.config
        rows = sorted(rows)
        if not rows:
            raise ValueError("simulate: the workload has no requests")
        t0 = rows[0][0]
        self.prefill = _Pool(c.prefill, t0, self.static[0] if self.static else None)
        self.decode = _Pool(c.decode, t0, self.static[1] if self.static else None)
        self.requests = [_Req(a, max(1, i), max(1, o)) for a, i, o in rows]
        for req in self.requests:
            self._at(req.arrival, "arrive", req)
        if not self.static:
            self._at(t0 + c.control_period_s, "control")
        end = t0
        while self._events:
            t, _, kind, data = heapq.heappop(self._events)
            end = max(end, t)
            getattr(self, "_" + kind)(t, *data)
            if kind == "control" and all(r.end is not None for r in self.requests):
                break
        return self._report(t0, end)

    # ------------------------------------------------------------------- prefill

    def _arrive(self, t: float, req: _Req) -> None:
        replica = self.prefill.choose(t, key=lambda r: r.queued_tokens)
        replica.queue.append(req)
        replica.queued_tokens += req.isl
        replica.arrived.append((t, req.isl))
        self._start_prefill(max(t, replica.ready_at), replica)

    def _start_prefill(self, t: float, replica: _Replica) -> None:
        if replica.stepping or not replica.queue:
            return
        if t < replica.ready_at:
            self._at(replica.ready_at, "kick_prefill", replica)
            return
        req = replica.queue[0]
        replica.stepping = True
        self._at(t + req.isl / self.config.speed.prefill_tok_s, "prefilled", replica)

    def _kick_prefill(self, t: float, replica: _Replica) -> None:
        self._start_prefill(t, replica)

    def _prefilled(self, t: float, replica: _Replica) -> None:
        req = replica.queue.popleft()
        replica.queued_tokens -= req.isl
        replica.stepping = False
        self._start_prefill(t, replica)
        self._retire(t, replica)
        target = self.decode.choose(t, key=lambda r: len(r.running) + len(r.queue))
        target.queue.append(req)
        self._start_step(t, target)

    # -------------------------------------------------------------------- decode

    def _start_step(self, t: float, replica: _Replica) -> None:
        if replica.stepping:
            return
        if t < replica.ready_at:
            self._at(replica.ready_at, "kick_decode", replica)
            return
        limit = self.config.speed.max_num_seqs
        while replica.queue and len(replica.running) < limit:
            req = replica.queue.popleft()
            # its first token comes from the next step, its last osl - 1 steps later
            finish = replica.steps + req.osl
            heapq.heappush(replica.running, (finish, next(self._seq), req))
            replica.joined.append(req)
        if not replica.running:
            return
        replica.stepping = True
        self._at(t + self.config.speed.step_time(len(replica.running)), "stepped", replica,
                 t)

    def _kick_decode(self, t: float, replica: _Replica) -> None:
        self._start_step(t, replica)

    def _stepped(self, t: float, replica: _Replica, started: float) -> None:
        replica.stepping = False
        replica.steps += 1
        for req in replica.joined:
            req.first_token = t
        later = len(replica.running) - len(replica.joined)
        if later:
            self._gaps.append((t - started, later))
        replica.joined = []
        while replica.running and replica.running[0][0] <= replica.steps:
            heapq.heappop(replica.running)[2].end = t
        self._start_step(t, replica)
        self._retire(t, replica)

    # ------------------------------------------------------------------- scaling

    def _retire(self, t: float, replica: _Replica) -> None:
        """A draining replica leaves once it has nothing left to do."""
        if replica.draining and replica.gone_at is None and replica.idle():
            replica.gone_at = t

    def _control(self, t: float) -> None:
        c = self.config
        for pool, metrics in ((self.prefill, self._prefill_metrics(t)),
                              (self.decode, self._decode_metrics(t))):
            current = len(pool.live(t))
            want = pool.policy.decide(current, metrics)
            want = max(pool.plan.min_replicas, min(pool.plan.max_replicas, want))
            if want == current:
                pool.wish = None
                continue
            # as Serve does: a wish counts from when the pool first wanted to move this
            # way (up or down), whatever count it wants now
            direction = 1 if want > current else -1
            if pool.wish is None or pool.wish[0] != direction:
                pool.wish = (direction, t)
            delay = pool.plan.upscale_delay_s if want > current else pool.plan.downscale_delay_s
            if t - pool.wish[1] < delay:
                continue
            pool.wish = None
            if want > current:
                for _ in range(want - current):
                    pool.replicas.append(_Replica(ready_at=t + c.startup_s))
            else:
                busy = lambda r: len(r.running) + len(r.queue)  # noqa: E731
                for replica in sorted(pool.live(t), key=busy)[: current - want]:
                    replica.draining = True
                    self._retire(t, replica)
            pool.history.append((t, want))
        if any(r.end is None for r in self.requests):
            self._at(t + c.control_period_s, "control")

    def _prefill_metrics(self, t: float) -> dict[str, dict[int, float]]:
        """As a prefill replica reports them (prompt tokens arriving: over the last 5 s)."""
        ready = [r for r in self.prefill.live(t) if r.ready_at <= t]
        for r in self.prefill.replicas:
            while r.arrived and r.arrived[0][0] < t - 5.0:
                r.arrived.popleft()
        return {"queued_prompt_tokens": {id(r): r.queued_tokens for r in ready},
                "waiting": {id(r): len(r.queue) for r in ready},
                "prompt_tokens_per_s": {id(r): sum(n for _, n in r.arrived) / 5.0
                                        for r in ready}}

    def _decode_metrics(self, t: float) -> dict[str, dict[int, float]]:
        ready = [r for r in self.decode.live(t) if r.ready_at <= t]
        limit = self.config.speed.max_num_seqs
        return {"running": {id(r): len(r.running) for r in ready},
                "kv_usage": {id(r): min(1.0, (len(r.running) + len(r.queue)) / limit)
                             for r in ready}}

    # -------------------------------------------------------------------- report

    def _replica_seconds(self, pool: _Pool, end: float) -> float:
        total = 0.0
        for r in pool.replicas:
            start = r.ready_at - self.config.startup_s if r.ready_at > self.requests[0].arrival \
                else r.ready_at
            total += max(0.0, (r.gone_at if r.gone_at is not None else end) - start)
        return total

    def _report(self, t0: float, end: float) -> dict:
        c = self.config
        ttft = [r.first_token - r.arrival for r in self.requests if r.first_token is not None]
        met = sum(
            1 for r in self.requests
            if r.first_token is not None and r.first_token - r.arrival <= c.slo_ttft_s
            and (r.tpot_s is None or r.tpot_s <= c.slo_itl_s)
        )
        replica_s = self._replica_seconds(self.prefill, end) + self._replica_seconds(
            self.decode, end
        )
        gpu_s = replica_s * c.speed.gpus_per_replica
        return {
            "requests": len(self.requests),
            "duration_s": end - t0,
            "gpu_hours": gpu_s / 3600,
            "attainment": met / len(self.requests),
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": _weighted_percentile(self._gaps, 50),
            "itl_p99_s": _weighted_percentile(self._gaps, 99),
            "prefill_replicas": [(t - t0, n) for t, n in self.prefill.history],
            "decode_replicas": [(t - t0, n) for t, n in self.decode.history],
            "peak": (max(n for _, n in self.prefill.history),
                     max(n for _, n in self.decode.history)),
        }


def _weighted_percentile(pairs: list[tuple[float, int]], q: float) -> float | None:
    """The q-th percentile of values given as (value, count)."""
    if not pairs:
        return None
    ordered = sorted(pairs)
    total = sum(n for _, n in ordered)
    rank, seen = q / 100 * (total - 1), 0
    for value, n in ordered:
        seen += n
        if seen > rank:
            return value
    return ordered[-1][0]


def compare(config: SimConfig, rows: Sequence[tuple[float, int, int]]) -> dict:
    """The autoscaled run, and static pools sized at its peak, on the same workload."""
    autoscaled = Simulation(config).run(rows)
    static = Simulation(config, static=autoscaled["peak"]).run(rows)
    return {"autoscaled": autoscaled, "static_at_peak": static,
            "gpu_hours_saved": 1 - autoscaled["gpu_hours"] / static["gpu_hours"]}


def write_simulation(out_dir: str | Path, result: dict) -> Path:
    """simulation.json, and simulation.png (replicas per pool over time, both runs) when
    matplotlib is there."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulation.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    fig, ax = plt.subplots(figsize=(9, 3.2))
    end = result["autoscaled"]["duration_s"]
    for pool in ("prefill", "decode"):
        steps = result["autoscaled"][f"{pool}_replicas"]
        ax.step([t for t, _ in steps] + [end], [n for _, n in steps] + [steps[-1][1]],
                where="post", label=f"{pool} (autoscaled)")
    peak = result["static_at_peak"]["peak"]
    ax.axhline(peak[0], color="grey", linestyle="--", label=f"static prefill {peak[0]}")
    ax.axhline(peak[1], color="black", linestyle=":", label=f"static decode {peak[1]}")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("replicas")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "simulation.png", dpi=80)
    plt.close(fig)
    return out
