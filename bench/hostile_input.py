"""Hostile input against the gRPC API: how fast each is refused, and what a stream of them
costs concurrent normal requests (issue 19, RELIABILITY.md targets 10 and 18).

    .venv/bin/python -m bench.hostile_input [--seconds 10] [--rounds 3] [--normal-clients 4]
                                            [--hostile-rate R] [--json OUT]

The server runs in its own process (the in-process backend: the tiny model on one CPU
engine, as tests/support/api_server.py builds it), so the clients' threads do not share
its interpreter. Phases, each `--seconds` long, with `--normal-clients` threads sending
Generate requests back to back (a 10-token prompt, 8 greedy tokens), `--rounds` times
alternated so that drift in the machine's load falls on both alike:

    baseline        normal requests only
    hostile         plus one thread sending the hostile requests below, in turn, back to
                    back or `--hostile-rate` a second
    cpu cost        (first) each hostile kind sent 40 times in a row on an otherwise idle
                    server, and 40 normal requests: the server process's CPU time (user +
                    system, from /proc) a request, independent of other load on the
                    machine unlike the latencies; and the wall time to each answer.
    unbounded       (once, at the end) hostile again, against a server whose limits are
                    raised out of the way (limits.RequestLimits with huge counts): what
                    the bounds save

The spread of the baseline rounds' p99 is the noise the hostile rounds compare against.

Hostile requests are serialized once and sent as raw bytes, so the client spends nothing
building them. Reported: p50/p99/max of the normal requests per phase; per hostile kind,
its status codes and p50/max time to the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench import run_info
from tandem.cluster.api.gen import tandem_pb2 as pb

GENERATE = "/tandem.v1.Tandem/Generate"
CHAT = "/tandem.v1.Tandem/Chat"


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def _user(n: int) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role="user") for _ in range(n)]


def hostile_requests() -> dict[str, tuple[str, bytes]]:
    """kind -> (method, serialized request)."""
    deep = '{"type": "object", "x": ' + nested(500) + "}"
    chats = {
        "deep tool schema (500 levels)": pb.ChatRequest(
            messages=_user(1), tools=[pb.Tool(name="f", parameters_json=deep)]
        ),
        "350,000 empty messages (2.8 MB)": pb.ChatRequest(messages=_user(350_000)),
        "200,000 empty messages (1.6 MB)": pb.ChatRequest(messages=_user(200_000)),
        # The most messages that fit max_request_bytes (2 bytes each): the worst parse.
        "1,000,000 bare messages (2.0 MB)": pb.ChatRequest(messages=[pb.ChatMessage()] * 1_000_000),
        "129 tools": pb.ChatRequest(
            messages=_user(1), tools=[pb.Tool(name=f"f{i}") for i in range(129)]
        ),
        "tool text over 256 KiB": pb.ChatRequest(
            messages=_user(1), tools=[pb.Tool(name="f", description="d" * 300_000)]
        ),
        "100,000 stop strings": pb.ChatRequest(
            messages=_user(1), params=pb.SamplingParameters(stop=["s"] * 100_000)
        ),
    }
    out = {k: (CHAT, v.SerializeToString()) for k, v in chats.items()}
    ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2**30] * 600_000))
    out["3 MB of token ids"] = (GENERATE, ids.SerializeToString())
    return out


# ------------------------------------------------------------------------- server


def serve(args: argparse.Namespace) -> None:
    """The server process: prints "PORT <n>" once serving, stops when stdin closes."""
    import asyncio

    from tandem.cluster.api.limits import RequestLimits
    from tandem.cluster.api.server import ServerConfig, TandemServer
    from tandem.workers.synthetic.tiny_model import default_model_dir
    from tests.support.api_server import new_backend

    limits = RequestLimits()
    if args.unbounded:
        big = 10**9
        limits = RequestLimits(
            max_request_bytes=8 * 1024 * 1024,
            max_messages=big,
            max_tools=big,
            max_tool_bytes=big,
            max_json_depth=big,
        )

    async def main() -> None:
        backend, _, _ = new_backend(default_model_dir())
        server = await TandemServer.start(backend, ServerConfig(port=0, limits=limits))
        print(f"PORT {server.port}", flush=True)
        await asyncio.to_thread(sys.stdin.read)
        await server.stop(0)
        await backend.close()

    asyncio.run(main())


class ServerProcess:
    def __init__(self, unbounded: bool) -> None:
        cmd = [sys.executable, "-m", "bench.hostile_input", "--serve"]
        if unbounded:
            cmd.append("--unbounded")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.target = f"127.0.0.1:{int(line.split()[1])}"

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ------------------------------------------------------------------------- phases


@dataclass
class Phase:
    name: str
    normal_s: list[float] = field(default_factory=list)
    normal_errors: int = 0
    hostile: dict[str, list[tuple[str, float]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, other: Phase) -> None:
        """Take in another phase's records (rounds merged into one)."""
        self.normal_s += other.normal_s
        self.normal_errors += other.normal_errors
        for kind, records in other.hostile.items():
            self.hostile[kind] += records


def _normal_loop(target: str, stop: threading.Event, phase: Phase, lock: threading.Lock) -> None:
    request = pb.GenerateRequest(
        text="The quick brown fox jumps over the lazy dog.",
        params=pb.SamplingParameters(max_tokens=8, temperature=0.0),
    ).SerializeToString()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_stream(GENERATE)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                chunks = list(call(request, timeout=60))
                ok = bool(chunks)
            except grpc.RpcError:
                ok = False
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    phase.normal_s.append(dt)
                else:
                    phase.normal_errors += 1


def _hostile_loop(
    target: str,
    stop: threading.Event,
    phase: Phase,
    lock: threading.Lock,
    only: str | None,
    rate: float,
) -> None:
    """Hostile requests in turn, back to back (`rate` 0) or started `rate` times a second."""
    requests = hostile_requests()
    kinds = [k for k in requests if only is None or k == only]
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as channel:
        calls = {GENERATE: channel.unary_stream(GENERATE), CHAT: channel.unary_stream(CHAT)}
        i, start = 0, time.perf_counter()
        while not stop.is_set():
            if rate > 0 and stop.wait(max(0.0, start + i / rate - time.perf_counter())):
                break
            kind = kinds[i % len(kinds)]
            i += 1
            method, data = requests[kind]
            t0 = time.perf_counter()
            try:
                list(calls[method](data, timeout=60))
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            dt = time.perf_counter() - t0
            with lock:
                phase.hostile[kind].append((code, dt))


def run_phase(
    name: str,
    target: str,
    seconds: float,
    clients: int,
    hostile: bool,
    only: str | None = None,
    rate: float = 0.0,
) -> Phase:
    phase, lock, stop = Phase(name), threading.Lock(), threading.Event()
    threads = [
        threading.Thread(target=_normal_loop, args=(target, stop, phase, lock))
        for _ in range(clients)
    ]
    if hostile:
        threads.append(
            threading.Thread(target=_hostile_loop, args=(target, stop, phase, lock, only, rate))
        )
    run_for(threads, stop, seconds)
    return phase


def run_for(threads: list[threading.Thread], stop: threading.Event, seconds: float) -> None:
    """Start the phase's threads, let them run `seconds`, then stop and join them."""
    for t in threads:
        t.start()
    time.sleep(seconds)  # the measurement window itself, not a synchronisation
    stop.set()
    for t in threads:
        t.join(120)


def cpu_cost(server: ServerProcess, repeats: int = 40) -> dict[str, dict]:
    """Server CPU milliseconds a request, per hostile kind and for a normal request."""
    normal = pb.GenerateRequest(
        text="The quick brown fox jumps over the lazy dog.",
        params=pb.SamplingParameters(max_tokens=8, temperature=0.0),
    ).SerializeToString()
    kinds = {"normal request (8 tokens)": (GENERATE, normal), **hostile_requests()}
    out = {}
    with grpc.insecure_channel(server.target) as channel:
        for kind, (method, data) in kinds.items():
            call = channel.unary_stream(method)
            codes: dict[str, int] = defaultdict(int)
            walls = []
            before = server.cpu_s()
            for _ in range(repeats):
                t0 = time.perf_counter()
                try:
                    list(call(data, timeout=60))
                    codes["OK"] += 1
                except grpc.RpcError as err:
                    codes[err.code().name] += 1
                walls.append(1000 * (time.perf_counter() - t0))
            spent = server.cpu_s() - before
            out[kind] = {
                "cpu_ms_a_request": round(1000 * spent / repeats, 2),
                "wall_p50_ms": round(statistics.median(walls), 1),
                "wall_max_ms": round(max(walls), 1),
                "codes": dict(codes),
            }
    return out


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def summary(phase: Phase) -> dict:
    ms = [x * 1000 for x in phase.normal_s]
    out = {
        "phase": phase.name,
        "normal_requests": len(ms),
        "normal_errors": phase.normal_errors,
        "p50_ms": round(_pct(ms, 0.50), 1),
        "p99_ms": round(_pct(ms, 0.99), 1),
        "max_ms": round(max(ms), 1) if ms else None,
        "hostile": {},
    }
    for kind, records in phase.hostile.items():
        times = [dt * 1000 for _, dt in records]
        codes: dict[str, int] = defaultdict(int)
        for code, _ in records:
            codes[code] += 1
        out["hostile"][kind] = {
            "count": len(records),
            "codes": dict(codes),
            "p50_ms": round(statistics.median(times), 1),
            "p90_ms": round(_pct(times, 0.90), 1),
            "max_ms": round(max(times), 1),
            "under_50_ms": round(sum(t < 50 for t in times) / len(times), 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--hostile-rate",
        type=float,
        default=0.0,
        help="hostile requests a second (0: back to back)",
    )
    parser.add_argument("--normal-clients", type=int, default=4)
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--unbounded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return

    results = []
    server = ServerProcess(unbounded=False)
    try:
        run_phase("warm-up", server.target, 3, args.normal_clients, hostile=False)
        costs = cpu_cost(server)
        print(json.dumps({"cpu_cost": costs}), flush=True)
        merged = {
            "baseline": Phase("baseline, all rounds"),
            "hostile": Phase("hostile, all rounds"),
        }
        for r in range(args.rounds):
            for name, hostile in (("baseline", False), ("hostile", True)):
                phase = run_phase(
                    f"{name} {r + 1}",
                    server.target,
                    args.seconds,
                    args.normal_clients,
                    hostile,
                    rate=args.hostile_rate,
                )
                results.append(summary(phase))
                print(json.dumps(results[-1]), flush=True)
                merged[name].add(phase)
        for phase in merged.values():
            results.append(summary(phase))
            print(json.dumps(results[-1]), flush=True)
    finally:
        server.close()
    server = ServerProcess(unbounded=True)
    try:
        run_phase("warm-up", server.target, 3, args.normal_clients, hostile=False)
        phase = run_phase(
            "unbounded (350,000 empty messages only)",
            server.target,
            args.seconds,
            args.normal_clients,
            hostile=True,
            only="350,000 empty messages (2.8 MB)",
        )
        results.append(summary(phase))
        print(json.dumps(results[-1]), flush=True)
    finally:
        server.close()

    meta = {
        **run_info.stamp(),
        "seconds_a_phase": args.seconds,
        "rounds": args.rounds,
        "hostile_rate": args.hostile_rate or "back to back",
        "normal_clients": args.normal_clients,
    }
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "cpu_cost": costs, "phases": results}, f, indent=1)


if __name__ == "__main__":
    main()
