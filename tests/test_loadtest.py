"""`tandem loadtest`: arrivals, workloads and figures checked exactly on constructed data,
then the command against a real gRPC server and the HTTP app over the same in-process
engine (tiny model) over loopback, and the replica sampler against a real redis-server."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tandem.cluster.http.app import HttpConfig
from tandem.cluster.loadtest.arrivals import (
    Constant,
    Gamma,
    Phase,
    Poisson,
    RateSchedule,
    make_arrivals,
)
from tandem.cluster.loadtest.driver import Driver, RequestRecord, RunLimits
from tandem.cluster.loadtest.replicas import ReplicaSampler
from tandem.cluster.loadtest.report import SLO, percentile, summarize, write_report
from tandem.cluster.loadtest.transport import DEADLINE_HEADER, HttpTransport
from tandem.cluster.loadtest.workloads import (
    Agentic,
    Lengths,
    LoadRequest,
    MooncakeTrace,
    SharedPrefix,
    Synthetic,
    Vocab,
)
from tandem.workers.control_plane import WorkerCapacity, WorkerInfo, WorkerRegistry
from tandem.workers.synthetic.tiny_model import default_model_dir
from tests.support.api_server import EventLoopThread, HttpServer, new_backend

# ------------------------------------------------------------------------- arrivals


def test_schedule_parse_and_integrated_rate():
    s = RateSchedule.parse("10s@2,20s@2->6,5s@0")
    assert s.phases == (Phase(10, 2), Phase(20, 2, 6), Phase(5, 0))
    assert s.duration_s == 35
    assert s.rate_at(5) == 2 and s.rate_at(20) == 4 and s.rate_at(32) == 0
    # Lambda(10) = 20; on the ramp Lambda(10 + u) = 20 + 2u + u^2/10
    assert s.time_of(20) == pytest.approx(10)
    assert s.time_of(20 + 2 * 10 + 100 / 10) == pytest.approx(20)
    assert s.time_of(20 + 80) == pytest.approx(30)
    assert s.time_of(100.5) is None
    with pytest.raises(ValueError, match="bad phase '10s@-1'"):
        RateSchedule.parse("10s@-1")
    with pytest.raises(ValueError, match="bad phase 'fast'"):
        RateSchedule.parse("fast")


def test_arrivals_are_seeded_and_follow_the_rate():
    ramp = RateSchedule((Phase(500, 1, 9),))  # expected 2,500 arrivals
    for process in (Poisson(ramp), Gamma(ramp, 1.5), Constant(ramp)):
        first = list(process.times(7))
        assert first == list(process.times(7))
        assert first != list(Constant(RateSchedule.constant(2, 10)).times(7))
        assert all(0 <= a <= b < 500 for a, b in zip(first, first[1:], strict=False))
        # the count in each half follows the integrated rate: 250 + 8/500 * 250^2 / 2 = 750
        # expected in the first, 1,750 in the second
        early = sum(1 for t in first if t < 250)
        assert early == pytest.approx(750, rel=0.15 if isinstance(process, Gamma) else 0.08)
        assert len(first) - early == pytest.approx(1750, rel=0.1)
    assert list(Constant(RateSchedule.constant(4, 1)).times(0)) == [0.25, 0.5, 0.75]
    assert list(Poisson(RateSchedule((Phase(100, 0),))).times(0)) == []


def test_gamma_burstiness_shows_in_the_gaps():
    schedule = RateSchedule.constant(10, 2000)
    for cv in (0.5, 3.0):
        times = list(Gamma(schedule, cv).times(3))
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        mean = sum(gaps) / len(gaps)
        std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
        assert mean == pytest.approx(0.1, rel=0.05)
        assert std / mean == pytest.approx(cv, rel=0.1)
    with pytest.raises(ValueError, match="--arrival must be one of"):
        make_arrivals("weibull", schedule)


# ------------------------------------------------------------------------ workloads


def test_lengths_and_vocab():
    rng = random.Random(0)
    assert Lengths("7").sample(rng) == 7
    assert {Lengths("3-5").sample(rng) for _ in range(200)} == {3, 4, 5}
    assert all(1 <= Lengths("normal:10:50", cap=20).sample(rng) <= 20 for _ in range(200))
    with pytest.raises(ValueError, match="length 'zipf:3'"):
        Lengths("zipf:3")
    assert all(16 <= t < 100 for t in Vocab(100).tokens(rng, 500))
    with pytest.raises(ValueError, match="empty"):
        Vocab(10, first_id=10)


def test_shared_prefix_and_agentic_share_what_they_should():
    vocab = Vocab(1000)
    shared = SharedPrefix(vocab, 4, 32, Lengths("8"), Lengths("4"), zipf_s=1.5)
    requests = [r for r, _ in zip(shared.requests(1), range(400), strict=False)]
    by_doc: dict[str, set] = {}
    for r in requests:
        assert len(r.prompt_ids) == 40 and r.max_tokens == 4
        by_doc.setdefault(r.group, set()).add(r.prompt_ids[:32])
    assert all(len(prefixes) == 1 for prefixes in by_doc.values())
    counts = Counter(r.group for r in requests)
    assert counts["doc0"] > counts["doc1"] > counts["doc3"]  # Zipf popularity
    agentic = Agentic(vocab, 2, 16, Lengths("4"), Lengths("4"), max_context=40)
    last: dict[str, tuple] = {}
    for r, _ in zip(agentic.requests(2), range(50), strict=False):
        before = last.get(r.group)
        if before is not None and len(r.prompt_ids) > len(before):
            assert r.prompt_ids[: len(before)] == before and len(r.prompt_ids) == len(before) + 4
        assert len(r.prompt_ids) < 40
        last[r.group] = r.prompt_ids
    synthetic = Synthetic(vocab, Lengths("5"), Lengths("3"))
    a = [r for r, _ in zip(synthetic.requests(9), range(3), strict=False)]
    assert a == [r for r, _ in zip(synthetic.requests(9), range(3), strict=False)]


def test_mooncake_trace_reuses_blocks_by_hash_id(tmp_path):
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"timestamp": 0, "input_length": 10, "output_length": 3, "hash_ids": [7, 8, 9]},
        {"timestamp": 1500, "input_length": 12, "output_length": 2, "hash_ids": [7, 8, 11]},
        {"timestamp": 2500, "input_length": 5, "output_length": 2, "hash_ids": []},
    ]
    trace.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    a, b, c = MooncakeTrace(trace, Vocab(500), block_tokens=4, time_scale=2.0).requests(0)
    assert (a.at_s, b.at_s, c.at_s) == (0.0, 3.0, 5.0)
    assert (len(a.prompt_ids), len(b.prompt_ids), len(c.prompt_ids)) == (10, 12, 5)
    assert a.prompt_ids[:8] == b.prompt_ids[:8]  # blocks 7 and 8
    assert a.prompt_ids[8:10] != b.prompt_ids[8:10]  # 9 versus 11
    assert (a.max_tokens, b.max_tokens) == (3, 2)
    trace.write_text(json.dumps(lines[0]) + "\n{\"timestamp\": 1}\n")
    with pytest.raises(ValueError, match=r"trace.jsonl:2: not a Mooncake trace line"):
        list(MooncakeTrace(trace, Vocab(500)).requests(0))


# -------------------------------------------------------------------------- figures


def _record(i, sent, first, end, itl, status="OK", prompt=10, cached=0, out=None):
    r = RequestRecord(i, "", sent, prompt, 4, status=status, first_token_s=first, end_s=end,
                      cached_tokens=cached, itl_s=list(itl))
    r.output_tokens = out if out is not None else (len(itl) + 1 if first is not None else 0)
    return r


def test_summary_figures_are_exact():
    records = [
        _record(0, 0.0, 0.5, 0.8, [0.1, 0.2], cached=5),  # meets the SLO
        _record(1, 1.0, 3.0, 3.1, [0.1]),  # TTFT 2.0 s: misses
        _record(2, 2.0, 2.2, 4.0, [0.9, 0.9]),  # TPOT 0.9 s: misses
        _record(3, 3.0, None, 3.01, [], status="RESOURCE_EXHAUSTED"),
        _record(4, 4.0, 4.1, 10.0, [0.2]),  # meets
    ]
    s = summarize(records, SLO(ttft_s=1.0, itl_s=0.5), window_s=5.0)
    assert s["duration_s"] == 10.0 and s["sent"] == 5 and s["completed"] == 4
    assert s["errors_by_status"] == {"RESOURCE_EXHAUSTED": 1}
    assert s["attainment"] == 0.4 and not s["meets_90"] and s["goodput_rps"] == 0.2
    assert s["ttft_s"]["p50"] == pytest.approx(0.35) and s["ttft_s"]["max"] == 2.0
    assert s["itl_s"]["count"] == 6 and s["itl_s"]["max"] == 0.9
    assert s["output_tok_s"] == pytest.approx((3 + 2 + 3 + 2) / 10)
    assert s["prefix_hit_rate"] == pytest.approx(5 / 40)
    assert [w["sent"] for w in s["windows"]] == [5, 0]
    assert s["error_latency_s"]["max"] == pytest.approx(0.01)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 50) is None


def test_report_files(tmp_path):
    records = [_record(i, i * 0.5, i * 0.5 + 0.1, i * 0.5 + 0.4, [0.1, 0.2]) for i in range(20)]
    replicas = [(0.0, {"prefill": 1, "decode": 1}), (5.0, {"prefill": 2, "decode": 1})]
    summary = summarize(records, SLO(), replicas=replicas, config={"workload": "x"})
    out = write_report(tmp_path / "run", records, summary)
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["replicas"][1] == {"t_s": 5.0, "prefill": 2, "decode": 1}
    assert len(saved["requests"]) == 20
    for name in ("ttft_itl_cdf", "latency_over_time", "throughput", "replicas"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "&quot;workload&quot;" in page


# ------------------------------------------------------------- against real servers


@pytest.fixture(scope="module")
def servers():
    """(gRPC HOST:PORT, HTTP base URL) of one in-process engine."""
    loop = EventLoopThread()
    backend, _, _ = new_backend(default_model_dir(), model_id="tiny")
    server = loop.start_server(backend)
    http = HttpServer(loop, backend, HttpConfig())
    yield f"127.0.0.1:{server.port}", http.base.removesuffix("/v1")
    http.stop()
    loop.run(server.stop(0))
    loop.run(backend.close())
    loop.close()


@pytest.fixture(scope="module")
def server_target(servers):
    return servers[0]


def _loadtest(tmp_path: Path, target: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_API_KEY"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "tandem"), "loadtest", "--target", target,
         "--out", str(tmp_path), "--quiet", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_open_loop_shared_prefix_run(tmp_path, server_target):
    summary = _loadtest(
        tmp_path, server_target, "--workload", "shared-prefix", "--documents", "2",
        "--prefix-tokens", "48", "--isl", "8", "--osl", "6", "--rate", "8", "--duration", "4",
        "--max-requests", "24",
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    requests = saved["requests"]
    assert summary["sent"] == len(requests) == 24
    assert summary["completed"] + sum(summary["errors_by_status"].values()) == 24
    done = [r for r in requests if r["status"] == "OK"]
    assert done and all(r["output_tokens"] == 6 for r in done)
    assert all(r["prompt_tokens"] == 56 for r in requests)
    # two 48-token documents shared by 24 requests: most of each later prompt is cached
    assert summary["prefix_hit_rate"] > 0.5
    sends = [r["sent_s"] for r in requests]
    assert sends == sorted(sends) and sends[-1] < 4.0
    assert (tmp_path / "report.html").exists() and (tmp_path / "ttft_itl_cdf.png").exists()


@pytest.mark.parametrize("api", ["grpc", "http"])
def test_both_apis_give_the_same_run(tmp_path, servers, api):
    """The same seeded closed-loop run over gRPC and over HTTP (/v1/completions): every
    request completes with its tokens counted, its cached tokens seen."""
    target = servers[0] if api == "grpc" else servers[1]
    summary = _loadtest(
        tmp_path, target, "--workload", "shared-prefix", "--documents", "1",
        "--prefix-tokens", "40", "--isl", "8", "--osl", "5", "--concurrency", "2",
        "--max-requests", "8", "--seed", "3",
    )
    requests = json.loads((tmp_path / "results.json").read_text())["requests"]
    assert summary["completed"] == 8 and not summary["errors_by_status"]
    assert all(r["output_tokens"] == 5 and r["prompt_tokens"] == 48 for r in requests)
    assert all(len(r["itl_s"]) == 4 for r in requests)
    # one 40-token document (5 blocks of 8): the first two requests run at once and may
    # both compute it; every later one starts after one of them finished, and finds it
    assert sum(r["cached_tokens"] for r in requests) >= 6 * 40


def test_http_chat_workload_is_refused_by_name(tmp_path, servers):
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_API_KEY"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "tandem"), "loadtest", "--target", servers[1],
         "--out", str(tmp_path), "--quiet", "--workload", "chat"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode != 0 and "chat workload needs the gRPC API" in done.stderr


def test_http_refusals_keep_their_status_and_retry_after():
    """A 429 with Retry-After from the HTTP API reads as RESOURCE_EXHAUSTED with that
    retry-after, as over gRPC."""
    loop = EventLoopThread()
    backend, _, hooks = new_backend(default_model_dir(), model_id="tiny", max_waiting_requests=1)
    http = HttpServer(loop, backend, HttpConfig(retry_after_s=2))
    hooks.paused.set()  # the first request waits unscheduled, holding the only place

    async def two() -> list[RequestRecord]:
        driver = Driver(HttpTransport(http.base.removesuffix("/v1")), RunLimits(2, 60, 30))
        requests = iter([LoadRequest((1, 2, 3), 2), LoadRequest((4, 5, 6), 2)])

        async def release_when_refused() -> None:
            while not any(r.status == "RESOURCE_EXHAUSTED" for r in driver.records):
                await asyncio.sleep(0.01)  # polls the driver's records, bounded below
            hooks.paused.clear()

        release = asyncio.create_task(release_when_refused())
        await asyncio.wait_for(driver.concurrency(requests, 2), 60)
        release.cancel()
        return driver.records

    try:
        records = asyncio.run(two())
    finally:
        hooks.paused.clear()
        http.stop()
        loop.run(backend.close())
        loop.close()
    statuses = sorted(r.status for r in records)
    assert statuses == ["OK", "RESOURCE_EXHAUSTED"], [(r.status, r.error) for r in records]
    refused = next(r for r in records if not r.ok)
    assert refused.retry_after_s == 2.0 and "HTTP 429" in refused.error


def test_chat_sessions_resend_their_answers(tmp_path, server_target):
    summary = _loadtest(
        tmp_path, server_target, "--workload", "chat", "--conversations", "3", "--turns", "3",
        "--prefix-tokens", "16", "--isl", "4", "--osl", "5", "--think", "0.05",
        "--duration", "60",
    )
    requests = json.loads((tmp_path / "results.json").read_text())["requests"]
    assert summary["completed"] == 9
    by_chat: dict[str, list] = {}
    for r in requests:
        by_chat.setdefault(r["group"], []).append(r["prompt_tokens"])
    # each turn: the previous prompt + its 5-token answer + a 4-token message
    assert sorted(by_chat.values()) == [[20, 29, 38]] * 3
    assert summary["prefix_hit_rate"] > 0.3


def test_replica_sampler_counts_live_workers(redis_url):
    registries = []
    for n, role in enumerate(("prefill", "decode", "decode")):
        registry = WorkerRegistry(redis_url, cluster="lt")
        capacity = WorkerCapacity(max_num_seqs=8, kv_blocks=(64,), block_size=8)
        registry.register(WorkerInfo(replica_id=f"r{n}", role=role, model="tiny",
                                     capacity=capacity))
        registries.append(registry)
    ticks = iter(range(100))
    with ReplicaSampler(redis_url, "lt", clock=lambda: float(next(ticks))) as sampler:
        sampler.sample()
    assert sampler.samples[-1][1] == {"prefill": 1, "decode": 2}
    registries[1].deregister()
    sampler.sample()
    assert sampler.samples[-1][1] == {"prefill": 1, "decode": 1}
    for registry in registries:
        registry.close()


def test_the_deadline_header_is_the_servers():
    from tandem.cluster.http import app

    assert DEADLINE_HEADER == app.DEADLINE_HEADER
