"""Autoscaling and admission on a real cluster (Ray Serve, Redis, gRPC; tiny model on
CPU). Each pool scales on its own signals: a prefill-heavy phase (long distinct prompts,
one output token) grows the prefill pool and leaves decode alone; a decode-heavy phase
(short prompts, long outputs) grows decode and leaves prefill alone; each shrinks back
when its load ends. Load comes from `tandem loadtest`'s driver; every request completes
or is refused at once with a retryable code, and the run's report (JSON, plots) is
written. Then 3x overload: the excess is refused with a retry-after."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tandem.cluster.loadtest.driver import Driver, RunLimits
from tandem.cluster.loadtest.replicas import ReplicaSampler
from tandem.cluster.loadtest.report import SLO, summarize, write_report
from tandem.cluster.loadtest.workloads import Lengths, Synthetic, Vocab
from tandem.workers.model.config import load_config
from tests.support.cluster import serve_cluster, wait_for
from tests.support.overload import run_overload

ENGINE = {
    "device": "cpu",
    "dtype": "float32",
    "block_size": 8,
    "kv_cache_tokens": 4096,
    "max_num_seqs": 16,
    "max_num_batched_tokens": 64,
    "max_model_len": 512,
}


# Admission bound of the test cluster: a few unloaded prefills of the prompts below.
MAX_START_DELAY_S = 0.4


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


@pytest.fixture(scope="module")
def cluster(tiny_model_dir) -> Iterator:
    with serve_cluster(
        str(tiny_model_dir),
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
        ingress_args={"max_start_delay_s": MAX_START_DELAY_S},
    ) as c:
        yield c


class Load:
    """A closed loop of `workers` streams (the loadtest driver) on a thread of its own,
    until stopped: it saturates a pool without overloading the machine."""

    def __init__(self, target: str, workload: Synthetic, workers: int, seed: int,
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


def test_each_pool_scales_on_its_own_load(cluster, tmp_path):
    vocab = Vocab(load_config(cluster.args["model"]).vocab_size)

    def counts() -> tuple[int, int]:
        return len(cluster.replicas("prefill")), len(cluster.replicas("decode"))

    assert counts() == (1, 1)
    records = []
    origin = time.monotonic()
    clock = lambda: time.monotonic() - origin  # noqa: E731
    with ReplicaSampler(cluster.redis_url, cluster.cluster_name, clock=clock) as sampler:
        # prefill-heavy: 6 streams of 200-token prompts, one token out
        prefill_heavy = Synthetic(vocab, Lengths("200"), Lengths("1"))
        load = Load(cluster.target, prefill_heavy, workers=6, seed=1, origin=origin)
        try:
            wait_for(lambda: counts()[0] == 2, 60, "the prefill pool to grow")
            assert counts()[1] == 1, "decode grew on a prefill-heavy load"
        finally:
            load.stop()
        records += load.driver.records
        wait_for(lambda: counts() == (1, 1), 60, "the prefill pool to shrink back")

        # decode-heavy: 8 streams of 8-token prompts (prefilled on the decode replica),
        # 64 tokens out
        decode_heavy = Synthetic(vocab, Lengths("8"), Lengths("64"))
        load = Load(cluster.target, decode_heavy, workers=8, seed=2, origin=origin)
        try:
            wait_for(lambda: counts()[1] == 2, 60, "the decode pool to grow")
            assert counts()[0] == 1, "prefill grew on a decode-heavy load"
        finally:
            load.stop()
        records += load.driver.records
        wait_for(lambda: counts() == (1, 1), 60, "the decode pool to shrink back")

    # No request lost: each completed, or was refused at once with a retryable code.
    statuses = Counter(r.status for r in records)
    assert set(statuses) <= {"OK", "RESOURCE_EXHAUSTED"}, statuses
    assert all(r.output_tokens == r.max_tokens for r in records if r.ok)
    assert sum(r.ok for r in records) > 20
    summary = summarize(records, SLO(ttft_s=5.0, itl_s=1.0), replicas=sampler.samples)
    out = write_report(tmp_path, records, summary)
    assert (out / "results.json").exists() and (out / "replicas.png").exists()
    seen = {(row.get("prefill", 0), row.get("decode", 0)) for row in summary["replicas"]}
    assert {(2, 1), (1, 2), (1, 1)} <= seen


def test_overload_is_refused_with_a_retry_after_and_nothing_is_lost(cluster):
    """3x the measured capacity, open loop: every request completes or is refused with
    RESOURCE_EXHAUSTED naming when to retry; both happen. Runs after the scaling test,
    on the same cluster. How fast refusals come and how admitted requests' TTFT compares
    with the unloaded one is measured by bench/overload.py (bench/RESULTS.md), not
    asserted here."""
    vocab = Vocab(load_config(cluster.args["model"]).vocab_size)
    run = run_overload(cluster.target, Synthetic(vocab, Lengths("160"), Lengths("8")))
    assert set(run.statuses) <= {"OK", "RESOURCE_EXHAUSTED"}, run.statuses
    assert run.statuses["OK"] and run.statuses["RESOURCE_EXHAUSTED"], run.statuses
    refused = [r for r in run.records if r.status == "RESOURCE_EXHAUSTED"]
    assert all(re.search(r"retry after \d+ s", r.error) for r in refused)
    assert all(r.output_tokens == 8 for r in run.records if r.ok)
