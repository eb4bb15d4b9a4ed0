"""The autoscaling and overload scenarios, shared by tests/test_autoscaling_cluster.py
(which checks what happened) and bench/autoscaling_cpu.py (which records the figures and
plots):

    autoscale_cluster()  a real cluster (Ray Serve, Redis, gRPC; tiny model, CPU) whose
                         prefill and decode pools autoscale 1..2 with PoolAutoscaler,
                         behind an ingress with admission control
    run_phases()         a prefill-heavy phase, then a decode-heavy one, each held until
                         its pool grew and released until it shrank back
    run_overload()       the unloaded time to first token, the capacity of a closed
                         loop, then an open loop at a multiple of that capacity
    run_deadlines()      300 requests at once with 2 s deadlines, then the time until
                         every worker is idle
    run_drain()          a decode replica removed by a scale-down while it streams
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ray import serve

from tandem.cluster.loadtest.arrivals import Constant, RateSchedule
from tandem.cluster.loadtest.driver import Driver, RequestRecord, RunLimits
from tandem.cluster.loadtest.replicas import ReplicaSampler
from tandem.cluster.loadtest.report import percentile
from tandem.cluster.loadtest.workloads import Lengths, Synthetic, Vocab, Workload
from tandem.workers.model.config import load_config
from tests.support.cluster import TEST_ENGINE, RunningCluster, serve_cluster, wait_for

ENGINE = {
    **TEST_ENGINE,
    "max_num_batched_tokens": 64,
    # long enough for the drain scenario's streams to outlive a scale-down
    "max_model_len": 2048,
}
# Admission bound of the cluster: about 1.5x the unloaded TTFT p99 of the prompts used
# here (admitted p99 lands at 1.2-1.5x the bound: cluster/admission.py).
MAX_START_DELAY_S = 0.3


def _policy(targets: dict[str, float], slo: dict[str, float] | None = None) -> dict:
    return {
        "min_replicas": 1,
        "max_replicas": 2,
        # Serve averages each reported figure over the look-back window
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2.0,
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 4.0,
        "policy": {
            "policy_function": "tandem.cluster.autoscaling:PoolAutoscaler",
            "policy_kwargs": {"targets": targets, "slo": slo or {}},
        },
    }


@contextmanager
def autoscale_cluster(model_dir: str) -> Iterator[RunningCluster]:
    with serve_cluster(
        model_dir,
        app="autoscale",
        cluster_name="autoscale",
        engine=ENGINE,
        placement={"prefill": "least_loaded", "decode": "least_loaded"},
        prefill=1,
        decode=1,
        ingress=1,
        autoscaling={
            "PrefillServer": _policy({"queued_prompt_tokens": 64, "waiting": 2},
                                     slo={"ttft_s": 0.15}),
            "DecodeServer": _policy({"running": 3}),
        },
        # about what the pools start within the bound: ~7 requests/s of 160 tokens x 0.3 s
        ingress_args={"max_start_delay_s": MAX_START_DELAY_S,
                      "admission_initial_limit_tokens": 512},
        # a decode replica Serve removes finishes its streams first (the chart: 120 s)
        deployment_options={"DecodeServer": {"graceful_shutdown_timeout_s": 120}},
    ) as cluster:
        yield cluster


def vocab_of(cluster: RunningCluster) -> Vocab:
    return Vocab(load_config(cluster.args["model"]).vocab_size)


def idle(cluster: RunningCluster) -> bool:
    """No worker replica runs or queues a request."""
    for role in ("prefill", "decode"):
        for replica in cluster.replicas(role):
            m = cluster.worker_metrics(role, replica)
            if m["running"] or m["waiting"]:
                return False
    return True


def wait_until_idle(cluster: RunningCluster, timeout_s: float) -> float:
    """Seconds until every worker is idle (fails past `timeout_s`)."""
    start = time.monotonic()
    wait_for(lambda: idle(cluster), timeout_s, "every worker idle")
    return time.monotonic() - start


def run_deadlines(cluster: RunningCluster) -> tuple[Counter, float]:
    """300 requests within half a second, 2 s deadlines, 400 tokens each to generate:
    their statuses, and the seconds from the last request's end until every worker is
    idle."""
    workload = Synthetic(vocab_of(cluster), Lengths("48"), Lengths("400"))
    limits = RunLimits(max_requests=300, duration_s=5, timeout_s=2.0, max_in_flight=400)
    driver = Driver(cluster.target, limits)
    times = Constant(RateSchedule.constant(600, 0.51)).times(5)
    asyncio.run(driver.open_loop(workload.requests(5), times))
    return Counter(r.status for r in driver.records), wait_until_idle(cluster, 5.0)


def decode_replica_states(cluster: RunningCluster) -> dict[str, int]:
    """Serve's view of the decode replicas: {"RUNNING": n, "STOPPING": m, ...}."""
    deployments = serve.status().applications[cluster.app].deployments
    return dict(deployments["DecodeServer"].replica_states)


def run_drain(cluster: RunningCluster) -> tuple[list[RequestRecord], bool]:
    """Grow the decode pool to 2 (the decode-heavy load of run_phases), then hold one
    long stream on each decode replica and nothing else: the pool's load is 2/3 of one
    replica's, so it shrinks while the streams run. Returns the two streams' records and
    whether a decode replica was seen STOPPING while they ran."""
    vocab = vocab_of(cluster)
    origin = time.monotonic()
    load = ClosedLoop(cluster.target, Synthetic(vocab, Lengths("8"), Lengths("64")), 8, 3,
                      origin)
    try:
        wait_for(lambda: len(cluster.replicas("decode")) == 2, 60, "the decode pool to grow")
    finally:
        load.stop()
    wait_for(lambda: idle(cluster), 30, "the growing load to finish")
    streams = Driver(cluster.target, RunLimits(max_requests=2, duration_s=60, timeout_s=120),
                     origin=origin)
    long = Synthetic(vocab, Lengths("8"), Lengths("1900"))
    job = threading.Thread(target=asyncio.run, args=(streams.concurrency(long.requests(4), 2),),
                           daemon=True)
    job.start()
    stopping = False
    deadline = time.monotonic() + 120
    while job.is_alive() and time.monotonic() < deadline:
        stopping |= decode_replica_states(cluster).get("STOPPING", 0) > 0
        job.join(0.2)
    job.join(10)
    return streams.records, stopping


class ClosedLoop:
    """`workers` streams (the loadtest driver) on a thread of their own until stopped:
    saturates a pool without overloading the machine."""

    def __init__(self, target: str, workload: Workload, workers: int, seed: int,
                 origin: float) -> None:
        limits = RunLimits(max_requests=2000, duration_s=300, timeout_s=60)
        self.driver = Driver(target, limits, origin=origin)
        self._stop = threading.Event()
        requests = workload.requests(seed)

        def until_stopped():
            for request in requests:
                if self._stop.is_set():
                    return
                yield request

        job = self.driver.concurrency(until_stopped(), workers)
        self._thread = threading.Thread(target=asyncio.run, args=(job,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(90)
        assert not self._thread.is_alive()


@dataclass
class PhasesRun:
    records: list[RequestRecord]
    # (t, {role: live replicas}) once a second
    replicas: list[tuple[float, dict[str, int]]]
    # replica counts (prefill, decode) seen while each phase held its load
    during_prefill_phase: set[tuple[int, int]]
    during_decode_phase: set[tuple[int, int]]


def run_phases(cluster: RunningCluster) -> PhasesRun:
    """Prefill-heavy load (6 streams of 200-token prompts, one token out) until the
    prefill pool has 2 replicas, released until both pools are back at 1; then
    decode-heavy load (8 streams of 8-token prompts, prefilled on the decode replica,
    64 tokens out) until decode has 2, released likewise."""
    vocab = vocab_of(cluster)

    def counts() -> tuple[int, int]:
        return len(cluster.replicas("prefill")), len(cluster.replicas("decode"))

    assert counts() == (1, 1)
    records: list[RequestRecord] = []
    seen: list[set[tuple[int, int]]] = []
    origin = time.monotonic()
    clock = lambda: time.monotonic() - origin  # noqa: E731
    phases = (
        (Synthetic(vocab, Lengths("200"), Lengths("1")), 6, 0, "the prefill pool to grow"),
        (Synthetic(vocab, Lengths("8"), Lengths("64")), 8, 1, "the decode pool to grow"),
    )
    with ReplicaSampler(cluster.redis_url, cluster.cluster_name, clock=clock) as sampler:
        for seed, (workload, workers, pool, what) in enumerate(phases, start=1):
            observed: set[tuple[int, int]] = set()
            load = ClosedLoop(cluster.target, workload, workers, seed, origin)
            try:

                def grown(pool=pool, observed=observed) -> bool:
                    now = counts()
                    observed.add(now)
                    return now[pool] == 2

                wait_for(grown, 60, what)
            finally:
                load.stop()
            records += load.driver.records
            seen.append(observed)
            wait_for(lambda: counts() == (1, 1), 60, "both pools back at one replica")
    return PhasesRun(records, sampler.samples, seen[0], seen[1])


@dataclass
class OverloadRun:
    unloaded_ttft_p99_s: float
    capacity_rps: float
    offered_rps: float
    records: list[RequestRecord]

    @property
    def statuses(self) -> Counter:
        return Counter(r.status for r in self.records)

    def figures(self) -> dict[str, float | None]:
        refused = [r.e2e_s for r in self.records if r.status == "RESOURCE_EXHAUSTED"]
        admitted = [r.ttft_s for r in self.records if r.ok]
        return {
            "unloaded_ttft_p99_s": self.unloaded_ttft_p99_s,
            "capacity_rps": self.capacity_rps,
            "offered_rps": self.offered_rps,
            "admitted": len(admitted),
            "refused": len(refused),
            "admitted_rps": len(admitted) / max(1e-9, max(r.sent_s for r in self.records)
                                                 - min(r.sent_s for r in self.records)),
            "refusal_p50_s": percentile(refused, 50),
            "refusal_p99_s": percentile(refused, 99),
            "admitted_ttft_p50_s": percentile(admitted, 50),
            "admitted_ttft_p99_s": percentile(admitted, 99),
        }


def run_overload(target: str, workload: Workload, factor: float = 3.0,
                 duration_s: float = 10.0, seed: int = 10) -> OverloadRun:
    origin = time.monotonic()
    unloaded = Driver(target, RunLimits(max_requests=8, duration_s=60), origin=origin)
    asyncio.run(unloaded.concurrency(workload.requests(seed), 1))
    assert all(r.ok for r in unloaded.records), Counter(r.status for r in unloaded.records)
    unloaded_p99 = percentile([r.ttft_s for r in unloaded.records], 99)

    closed = Driver(target, RunLimits(max_requests=400, duration_s=8), origin=origin)
    asyncio.run(closed.concurrency(workload.requests(seed + 1), 4))
    done = [r for r in closed.records if r.ok]
    capacity = len(done) / (max(r.end_s for r in done) - min(r.sent_s for r in done))

    rate = factor * capacity
    limits = RunLimits(max_requests=int(rate * duration_s) + 10, duration_s=duration_s,
                       timeout_s=60)
    # its own clock: the arrival times count from its start (a shared origin would put
    # them all in the past and send them at once)
    overload = Driver(target, limits)
    times = Constant(RateSchedule.constant(rate, duration_s)).times(seed + 2)
    asyncio.run(overload.open_loop(workload.requests(seed + 2), times))
    return OverloadRun(unloaded_p99, capacity, rate, overload.records)
