"""Autoscaling and admission on a real cluster (Ray Serve, Redis, gRPC; tiny model on
CPU). Each pool scales on its own signals: a prefill-heavy phase (long distinct prompts,
one output token) grows the prefill pool and leaves decode alone; a decode-heavy phase
(short prompts, long outputs) grows decode and leaves prefill alone; each shrinks back
when its load ends. Load comes from `tandem loadtest`'s driver; every request completes
or is refused at once with a retryable code, and the run's report (JSON, plots) is
written. Then 3x overload: the excess is refused with a retry-after."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import pytest

from tandem.cluster.loadtest.report import SLO, summarize, write_report
from tandem.cluster.loadtest.workloads import Lengths, Synthetic
from tests.support.autoscale import (
    autoscale_cluster,
    run_deadlines,
    run_drain,
    run_overload,
    run_phases,
    vocab_of,
)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir) -> Iterator:
    with autoscale_cluster(str(tiny_model_dir)) as c:
        yield c


def test_each_pool_scales_on_its_own_load(cluster, tmp_path):
    run = run_phases(cluster)
    # each phase grew its own pool only
    assert {decode for _, decode in run.during_prefill_phase} == {1}
    assert {prefill for prefill, _ in run.during_decode_phase} == {1}
    # No request lost: each completed, or was refused at once with a retryable code.
    statuses = Counter(r.status for r in run.records)
    assert set(statuses) <= {"OK", "RESOURCE_EXHAUSTED"}, statuses
    assert all(r.output_tokens == r.max_tokens for r in run.records if r.ok)
    assert sum(r.ok for r in run.records) > 20
    summary = summarize(run.records, SLO(ttft_s=5.0, itl_s=1.0), replicas=run.replicas)
    out = write_report(tmp_path, run.records, summary)
    assert (out / "results.json").exists() and (out / "replicas.png").exists()
    seen = {(row.get("prefill", 0), row.get("decode", 0)) for row in summary["replicas"]}
    assert {(2, 1), (1, 2), (1, 1)} <= seen


def test_a_replica_removed_by_a_scale_down_finishes_its_streams(cluster):
    """Two long streams, one on each of two decode replicas, and nothing else: the pool
    shrinks while they run (a replica is seen STOPPING), and both streams finish whole."""
    records, saw_stopping = run_drain(cluster)
    assert saw_stopping, "no decode replica was removed while the streams ran"
    assert [r.status for r in records] == ["OK", "OK"], [(r.status, r.error) for r in records]
    assert all(r.output_tokens == 1900 for r in records)


def test_overload_is_refused_with_a_retry_after_and_nothing_is_lost(cluster):
    """3x the measured capacity, open loop: every request completes or is refused with
    RESOURCE_EXHAUSTED naming when to retry; both happen. Runs after the scaling test,
    on the same cluster. How fast refusals come and how admitted requests' TTFT compares
    with the unloaded one is measured by bench/autoscaling_cpu.py (bench/RESULTS.md),
    not asserted here."""
    run = run_overload(cluster.target, Synthetic(vocab_of(cluster), Lengths("160"),
                                                 Lengths("8")))
    assert set(run.statuses) <= {"OK", "RESOURCE_EXHAUSTED"}, run.statuses
    assert run.statuses["OK"] and run.statuses["RESOURCE_EXHAUSTED"], run.statuses
    refused = [r for r in run.records if r.status == "RESOURCE_EXHAUSTED"]
    assert all(re.search(r"retry after \d+ s", r.error) for r in refused)
    # ...and in the trailing metadata, where clients read it
    assert all(r.retry_after_s is not None and r.retry_after_s >= 1 for r in refused)
    assert all(r.output_tokens == 8 for r in run.records if r.ok)


def test_deadlines_stop_the_work_of_300_concurrent_requests(cluster):
    """300 requests within half a second, each with a 2 s deadline and far more tokens
    to generate than fit in it: each ends admitted-then-DEADLINE_EXCEEDED, refused, or
    finished; soon after the last deadline no worker runs or queues anything (the
    deadline cancels the stream, and with it the work on every worker). The time that
    takes is recorded by bench/autoscaling_cpu.py."""
    statuses, _ = run_deadlines(cluster)
    assert sum(statuses.values()) == 300
    assert set(statuses) <= {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, statuses
    assert statuses["DEADLINE_EXCEEDED"], statuses
