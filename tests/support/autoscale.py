"""The overload scenario of RELIABILITY.md target 6 against a running cluster, shared by
tests/test_autoscaling_cluster.py (which checks what happened) and bench/overload.py
(which records how fast): the unloaded time to first token, the capacity of a closed
loop, then an open loop at a multiple of that capacity."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

from tandem.cluster.loadtest.arrivals import Constant, RateSchedule
from tandem.cluster.loadtest.driver import Driver, RequestRecord, RunLimits
from tandem.cluster.loadtest.report import percentile
from tandem.cluster.loadtest.workloads import Workload


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
    overload = Driver(target, limits, origin=origin)
    times = Constant(RateSchedule.constant(rate, duration_s)).times(seed + 2)
    asyncio.run(overload.open_loop(workload.requests(seed + 2), times))
    return OverloadRun(unloaded_p99, capacity, rate, overload.records)
