"""Autoscaling and overload on a real cluster on this CPU machine (tiny model).

    .venv/bin/python -m bench.autoscaling_cpu [--out bench/results/autoscaling_cpu]

The scenarios of tests/test_autoscaling_cluster.py (tests/support/autoscale.py), with
figures: a prefill-heavy then a decode-heavy phase on pools autoscaling 1..2
(PoolAutoscaler), the replica counts over time and the load test's report (results.json,
PNG plots, report.html) written to --out; then 3x the measured capacity in an open loop
against the ingress's admission control: refusal latency, admitted TTFT against the
unloaded one, admitted rate against the capacity, and the Ingress replica's resident
memory before and after; then 300 requests at once with 2 s deadlines, and the time
until every worker is idle. Prints one JSON object for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import psutil

from bench import run_info
from tandem.cluster.loadtest.report import SLO, summarize, write_report
from tandem.cluster.loadtest.workloads import Lengths, Synthetic
from tandem.workers.synthetic.tiny_model import make_tiny_model
from tests.support.autoscale import (
    MAX_START_DELAY_S,
    autoscale_cluster,
    run_deadlines,
    run_overload,
    run_phases,
    vocab_of,
)


def ingress_rss_mb() -> float:
    """Resident memory of the Ingress replica processes (Ray names them in their title)."""
    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        if any("Ingress" in part for part in proc.info["cmdline"] or ()):
            total += proc.memory_info().rss
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/autoscaling_cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny")
        with autoscale_cluster(str(model)) as cluster:
            phases = run_phases(cluster)
            summary = summarize(phases.records, SLO(ttft_s=5.0, itl_s=1.0),
                                replicas=phases.replicas, config={"scenario": "phases"})
            write_report(args.out, phases.records, summary)
            rss_before = ingress_rss_mb()
            overload = run_overload(cluster.target, Synthetic(vocab_of(cluster),
                                                              Lengths("160"), Lengths("8")))
            rss_after = ingress_rss_mb()
            # each overload request: when it was sent, how it ended, its time to first token
            (Path(args.out) / "overload_records.json").write_text(json.dumps([
                {"sent_s": round(r.sent_s, 4), "status": r.status,
                 "ttft_s": None if r.ttft_s is None else round(r.ttft_s, 4)}
                for r in overload.records
            ]))
            deadline_statuses, idle_after_s = run_deadlines(cluster)
    print(json.dumps({
        **run_info.stamp(),
        "phases": {
            "requests": len(phases.records),
            "statuses": dict(Counter(r.status for r in phases.records)),
            "replicas_seen_prefill_phase": sorted(phases.during_prefill_phase),
            "replicas_seen_decode_phase": sorted(phases.during_decode_phase),
            "ttft_p50_s": summary["ttft_s"]["p50"],
            "ttft_p99_s": summary["ttft_s"]["p99"],
        },
        "overload": {
            "max_start_delay_s": MAX_START_DELAY_S,
            **overload.figures(),
            "statuses": dict(overload.statuses),
            "ingress_rss_mb_before": rss_before,
            "ingress_rss_mb_after": rss_after,
        },
        "deadlines_300_concurrent": {
            "statuses": dict(deadline_statuses),
            "workers_idle_after_last_end_s": idle_after_s,
        },
    }, indent=1))


if __name__ == "__main__":
    main()
