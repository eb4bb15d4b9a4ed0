"""`tandem loadtest`: the command line over driver.py and report.py.

    tandem loadtest --target 127.0.0.1:50051 --workload synthetic --isl 512 --osl 64 \\
        --arrival poisson --rate 4 --duration 60 --out runs/poisson4
    tandem loadtest --target http://127.0.0.1:8000 ...            # the HTTP API instead
    tandem loadtest ... --schedule '30s@1,60s@1->8,30s@8->1'     # steps and ramps
    tandem loadtest ... --concurrency 16                          # closed loop
    tandem loadtest ... --workload chat --conversations 32 --turns 5 --think 2
    tandem loadtest ... --workload mooncake --trace trace.jsonl --time-scale 2
    tandem loadtest --simulate ... [--speeds speeds.json]         # no server: size a
                                                                  # GPU cluster (simulate.py)

Sends only to --target: HOST:PORT is the gRPC API, http://HOST:PORT (or https://) the
OpenAI-compatible HTTP API (/v1/completions; not for the chat workload, which needs the
answers' token ids). Prints a progress line a second on stderr and the summary as
JSON on stdout; writes results.json, PNG plots and report.html into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
from pathlib import Path

from tandem.cluster.loadtest.arrivals import RateSchedule, make_arrivals
from tandem.cluster.loadtest.driver import Driver, RunLimits, stderr_progress
from tandem.cluster.loadtest.replicas import ReplicaSampler
from tandem.cluster.loadtest.report import SLO, summarize, write_report
from tandem.cluster.loadtest.simulate import ReplicaSpeed, SimConfig, compare, write_simulation
from tandem.cluster.loadtest.transport import (
    GrpcTransport,
    HttpTransport,
    ModelInfo,
    RequestFailed,
    Transport,
)
from tandem.cluster.loadtest.workloads import (
    Agentic,
    ChatSessions,
    Lengths,
    MooncakeTrace,
    SharedPrefix,
    Synthetic,
    Vocab,
    Workload,
)

WORKLOADS = ("synthetic", "shared-prefix", "agentic", "chat", "mooncake")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loadtest", help="drive a running server with load and report")
    p.add_argument("--target", help="HOST:PORT of the gRPC API, or http://HOST:PORT of the "
                                    "HTTP API (not with --simulate)")
    p.add_argument("--simulate", action="store_true",
                   help="replay the workload against the autoscaling policy in a simulation "
                        "of GPU replicas instead of sending it (tandem.cluster.loadtest.simulate)")
    p.add_argument("--speeds", help="--simulate: replica speeds JSON (default: 20b on H100)")
    p.add_argument("--vocab-size", type=int, default=201088, help="--simulate: prompt ids")
    p.add_argument("--max-model-len", type=int, default=131072, help="--simulate")
    p.add_argument("--api-key-env", default="TANDEM_API_KEY",
                   help="environment variable holding the API key, if any")
    p.add_argument("--out", required=True, help="directory for results.json, plots, report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", choices=WORKLOADS, default="synthetic")
    p.add_argument("--isl", default="512", help="prompt tokens: N, A-B, normal:M:S, ...")
    p.add_argument("--osl", default="64", help="output tokens, same forms as --isl")
    p.add_argument("--documents", type=int, default=16, help="shared-prefix: prefixes")
    p.add_argument("--prefix-tokens", type=int, default=256, help="shared-prefix/agentic/chat")
    p.add_argument("--zipf", type=float, default=1.1, help="shared-prefix popularity skew")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--think", type=float, default=1.0, help="chat: mean think time (s)")
    p.add_argument("--trace", help="mooncake: the trace JSONL file")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--length-scale", type=float, default=1.0)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="open loop: requests/s for --duration")
    mode.add_argument("--schedule", help="open loop: phases, e.g. 30s@1,60s@1->8")
    mode.add_argument("--concurrency", type=int, help="closed loop: N at a time")
    p.add_argument("--arrival", default="poisson", help="poisson, gamma or constant")
    p.add_argument("--cv", type=float, default=2.0, help="gamma: coefficient of variation")
    p.add_argument("--duration", type=float, default=60.0, help="no request starts later")
    p.add_argument("--max-requests", type=int, default=1000)
    p.add_argument("--max-in-flight", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline (s)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--slo-ttft", type=float, default=1.0, help="seconds")
    p.add_argument("--slo-itl", type=float, default=0.05, help="seconds")
    p.add_argument("--redis-url", help="sample replica counts from this control plane")
    p.add_argument("--cluster", default="default", help="the control plane's cluster name")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=run)


def transport_for(target: str, api_key: str | None) -> Transport:
    """The transport a --target names: a URL is the HTTP API, HOST:PORT the gRPC API."""
    if target.startswith(("http://", "https://")):
        return HttpTransport(target, api_key)
    if "://" in target:
        raise ValueError(f"--target {target!r}: HOST:PORT (gRPC) or http(s)://HOST:PORT (HTTP)")
    return GrpcTransport(target, api_key)


async def _model_card(transport: Transport) -> ModelInfo:
    async with transport:
        return await transport.model()


def _workload(args: argparse.Namespace, vocab: Vocab, cap: int) -> Workload | ChatSessions:
    isl, osl = Lengths(args.isl, cap), Lengths(args.osl, cap)
    if args.workload == "synthetic":
        return Synthetic(vocab, isl, osl)
    if args.workload == "shared-prefix":
        return SharedPrefix(vocab, args.documents, args.prefix_tokens, isl, osl, args.zipf)
    if args.workload == "agentic":
        return Agentic(vocab, args.agents, args.prefix_tokens, isl, osl, cap)
    if args.workload == "chat":
        return ChatSessions(vocab, args.conversations, args.turns, args.prefix_tokens, isl,
                            osl, args.think)
    if not args.trace:
        raise SystemExit("tandem loadtest: --workload mooncake needs --trace FILE")
    return MooncakeTrace(Path(args.trace), vocab, time_scale=args.time_scale,
                         length_scale=args.length_scale)


def _simulate(args: argparse.Namespace) -> int:
    try:
        schedule = (RateSchedule.parse(args.schedule) if args.schedule
                    else RateSchedule.constant(args.rate or 1.0, args.duration))
        arrivals = make_arrivals(args.arrival, schedule, args.cv).times(args.seed + 1)
        workload = _workload(args, Vocab(args.vocab_size), args.max_model_len // 2)
        speed = ReplicaSpeed.from_json(args.speeds) if args.speeds else ReplicaSpeed()
    except (ValueError, OSError, TypeError) as err:
        raise SystemExit(f"tandem loadtest --simulate: {err}") from None
    if isinstance(workload, ChatSessions) or args.concurrency:
        raise SystemExit("tandem loadtest --simulate: open-loop workloads only (no chat, "
                         "no --concurrency)")
    rows = []
    for request in itertools.islice(workload.requests(args.seed), args.max_requests):
        if request.at_s is not None:  # a trace keeps its own clock, whole
            at = request.at_s
        else:
            at = next(arrivals, None)
            if at is None or at >= (schedule.duration_s if args.schedule else args.duration):
                break
        rows.append((at, len(request.prompt_ids), request.max_tokens))
    config = SimConfig(speed=speed, slo_ttft_s=args.slo_ttft, slo_itl_s=args.slo_itl)
    result = compare(config, rows)
    write_simulation(args.out, result)
    brief = {k: {f: v[f] for f in ("requests", "gpu_hours", "attainment", "ttft_p99_s",
                                   "itl_p99_s", "peak")}
             for k, v in result.items() if isinstance(v, dict)}
    print(json.dumps({**brief, "gpu_hours_saved": result["gpu_hours_saved"]}))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.simulate:
        return _simulate(args)
    if not args.target:
        raise SystemExit("tandem loadtest: --target HOST:PORT is required (or --simulate)")
    key = os.environ.get(args.api_key_env)
    try:
        limits = RunLimits(args.max_requests, args.duration, args.timeout, args.max_in_flight)
        schedule = (RateSchedule.parse(args.schedule) if args.schedule
                    else RateSchedule.constant(args.rate or 1.0, args.duration))
        arrivals = make_arrivals(args.arrival, schedule, args.cv)
        transport = transport_for(args.target, key)
        model = asyncio.run(_model_card(transport))
        vocab = Vocab(model.vocab_size)
        workload = _workload(args, vocab, max(1, model.max_model_len // 2))
        if isinstance(workload, ChatSessions) and not transport.gives_token_ids:
            raise ValueError("the chat workload needs the gRPC API (HOST:PORT): the HTTP API "
                             "does not return the answers' token ids")
    except RequestFailed as err:
        raise SystemExit(f"tandem loadtest: {args.target}: {err}") from None
    except ValueError as err:
        raise SystemExit(f"tandem loadtest: {err}") from None
    if args.schedule:
        limits = RunLimits(limits.max_requests, min(limits.duration_s, schedule.duration_s),
                           limits.timeout_s, limits.max_in_flight)
    driver = Driver(transport, limits, temperature=args.temperature,
                    progress=None if args.quiet else stderr_progress)
    if isinstance(workload, ChatSessions):
        job = driver.chat(workload, args.seed, model.max_model_len)
    elif args.concurrency:
        job = driver.concurrency(workload.requests(args.seed), args.concurrency)
    else:
        job = driver.open_loop(workload.requests(args.seed), arrivals.times(args.seed + 1))
    if args.redis_url:
        with ReplicaSampler(args.redis_url, args.cluster, driver.now) as sampler:
            asyncio.run(job)
        replicas = sampler.samples
    else:
        asyncio.run(job)
        replicas = []
    config = {k: v for k, v in vars(args).items() if k != "run"}
    config["model"] = {"id": model.id, "vocab_size": model.vocab_size,
                       "max_model_len": model.max_model_len}
    summary = summarize(driver.records, SLO(args.slo_ttft, args.slo_itl),
                        replicas=replicas, config=config)
    write_report(args.out, driver.records, summary)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("windows", "replicas")}))
    return 0
