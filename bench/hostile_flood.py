"""A flood of hostile requests against the CPU cluster's ingress, and what it costs
concurrent normal requests (issue 19, build point 4; RELIABILITY targets 10 and 18).

    .venv/bin/python -m bench.hostile_flood [--seconds 10] [--rounds 3]
                                            [--normal-clients 4] [--json OUT]

One local cluster (tests/support/cluster.py: a private Redis, Ray, 1 prefill + 1 decode
+ 1 ingress replica of the tiny model on CPU), gRPC over loopback. `--normal-clients`
threads send Generate requests back to back (a 10-token prompt, 8 greedy tokens) in
every phase; phases alternate, `--rounds` times, so drift in the machine's load falls
on all alike:

    baseline     normal requests only
    flood        plus one thread sending the hostile kinds of bench/hostile_input.py
                 (500-deep tool schema, 350,000 empty messages, ...) and fuzz-like
                 invalid ones (garbage bytes, out-of-range sampling parameters) in
                 turn, back to back on one connection: after its refusal budget
                 (cluster/api/refusals.py) the ingress answers it RESOURCE_EXHAUSTED
                 unparsed, held in the tarpit. The flood runs in a process of its own
                 (no client-side work of it lands in the normal clients' interpreter)
    reconnecting (last round only) the same flood, each request on a new connection:
                 every connection starts with a full budget, so this is what input
                 limits alone bound (and the handshake costs the flooder too)

The spread of the baseline rounds' p50 and p99 is the noise the others compare against.
Reported per phase: the normal requests' count, p50, p99, max; the ingress process's CPU
seconds per second (/proc); per hostile kind, its status codes and answer times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc

from bench import run_info
from bench.hostile_input import (
    CHAT,
    GENERATE,
    Phase,
    _normal_loop,
    hostile_requests,
    run_for,
    summary,
)
from tandem.cluster.api.gen import tandem_pb2 as pb


def flood_requests() -> dict[str, tuple[str, bytes]]:
    """hostile_input's kinds plus fuzz-like invalid requests: kind -> (method, bytes)."""
    out = dict(hostile_requests())
    out["garbage bytes"] = (GENERATE, b"\xff\xfe\x00garbage" * 16)
    bad = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1, 2, 3]),
        params=pb.SamplingParameters(temperature=-1.0, max_tokens=4),
    )
    out["temperature -1"] = (GENERATE, bad.SerializeToString())
    empty = pb.ChatRequest(params=pb.SamplingParameters(top_p=7.0))
    out["chat without messages, top_p 7"] = (CHAT, empty.SerializeToString())
    return out


def _flood_loop(
    target: str,
    stop: threading.Event,
    phase: Phase,
    lock: threading.Lock,
    reconnect: bool,
    requests: dict[str, tuple[str, bytes]],
) -> None:
    kinds = list(requests)
    options = [("grpc.max_send_message_length", -1), ("grpc.use_local_subchannel_pool", 1)]
    channel = grpc.insecure_channel(target, options=options)
    i = 0
    try:
        while not stop.is_set():
            if reconnect and i:
                channel.close()
                channel = grpc.insecure_channel(target, options=options)
            kind = kinds[i % len(kinds)]
            i += 1
            method, data = requests[kind]
            t0 = time.perf_counter()
            try:
                list(channel.unary_stream(method)(data, timeout=60))
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            with lock:
                phase.hostile[kind].append((code, time.perf_counter() - t0))
    finally:
        channel.close()


class FloodProcess:
    """The flood from a process of its own, so the normal clients' latencies carry none
    of its client-side work (serializing, sending megabytes) through this interpreter."""

    def __init__(self, target: str, reconnect: bool) -> None:
        cmd = [sys.executable, "-m", "bench.hostile_flood", "--flood-target", target]
        if reconnect:
            cmd.append("--reconnect")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ready(self) -> None:
        """Returns once the process has started flooding (its start-up is not measured)."""
        line = self.proc.stdout.readline()
        if line.strip() != "FLOODING":
            raise RuntimeError(f"the flood process did not start: {line!r}")

    def stop(self, phase: Phase) -> float:
        """Ends the flood; its records go into `phase`; returns its CPU seconds (start-up
        included: the process imports only grpc and the protobuf modules)."""
        spent = cpu_s(self.proc.pid)
        out, _ = self.proc.communicate("", timeout=120)
        for kind, records in json.loads(out).items():
            phase.hostile[kind] += [tuple(r) for r in records]
        return spent


def flood_main(target: str, reconnect: bool) -> None:
    """The flood process: floods until stdin closes, then prints its records as JSON."""
    phase, lock, stop = Phase("flood"), threading.Lock(), threading.Event()
    requests = flood_requests()  # built (seconds of CPU) before the phase starts
    thread = threading.Thread(
        target=_flood_loop, args=(target, stop, phase, lock, reconnect, requests)
    )
    thread.start()
    print("FLOODING", flush=True)
    sys.stdin.read()
    stop.set()
    thread.join(120)
    print(json.dumps(phase.hostile))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_phase(
    name: str, target: str, seconds: float, clients: int, flood: str, ingress_pid: int
) -> dict:
    """flood: "" (none), "one connection" or "reconnecting". The phase's summary, with
    the ingress process's CPU seconds per second."""
    phase, lock, stop = Phase(name), threading.Lock(), threading.Event()
    threads = [
        threading.Thread(target=_normal_loop, args=(target, stop, phase, lock))
        for _ in range(clients)
    ]
    flooder = FloodProcess(target, flood == "reconnecting") if flood else None
    if flooder is not None:
        flooder.ready()
    before = cpu_s(ingress_pid)
    run_for(threads, stop, seconds)
    spent = cpu_s(ingress_pid) - before
    flood_cpu = flooder.stop(phase) if flooder is not None else 0.0
    cpu = {
        "ingress_cpu_per_s": round(spent / seconds, 3),
        # the flooding client's own CPU, on the same machine
        "flood_client_cpu_per_s": round(flood_cpu / seconds, 3),
    }
    return {**summary(phase), **cpu}, phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--normal-clients", type=int, default=4)
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument("--flood-target", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reconnect", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_target:
        flood_main(args.flood_target, args.reconnect)
        return

    # Here, not at the top: the flood process imports this module and must stay light
    # (importing torch and Ray costs seconds of CPU, which would land in the phase).
    import ray

    from tandem.cluster.config import INGRESS
    from tandem.workers.synthetic.tiny_model import default_model_dir
    from tests.support.cluster import TEST_ENGINE, serve_cluster

    results = []
    load_before = os.getloadavg()
    with serve_cluster(
        str(default_model_dir()),
        app="hostile-flood",
        cluster_name="hostile-flood",
        engine=TEST_ENGINE,
        placement={},
        prefill=1,
        decode=1,
        ingress=1,
    ) as cluster:
        target = cluster.target
        [ingress] = cluster.ingress_replicas()
        actor = ray.get_actor(f"SERVE_REPLICA::hostile-flood#{INGRESS}#{ingress}", "serve")
        pid = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()))

        def phase_of(name: str, flood: str) -> Phase:
            result, phase = run_phase(name, target, args.seconds, args.normal_clients, flood, pid)
            results.append(result)
            print(json.dumps(result), flush=True)
            return phase

        phase_of("warm-up", "")
        merged = {name: Phase(f"{name}, all rounds") for name in ("baseline", "flood")}
        for r in range(args.rounds):
            for name, flood in (("baseline", ""), ("flood", "one connection")):
                merged[name].add(phase_of(f"{name} {r + 1}", flood))
        for phase in merged.values():
            results.append(summary(phase))
            print(json.dumps(results[-1]), flush=True)
        phase_of("reconnecting flood", "reconnecting")

    codes: dict[str, int] = defaultdict(int)
    for r in results:
        if r["phase"].endswith("all rounds"):
            continue
        for kind in r["hostile"].values():
            for code, n in kind["codes"].items():
                codes[code] += n
    meta = {
        **run_info.stamp(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "seconds_a_phase": args.seconds,
        "rounds": args.rounds,
        "normal_clients": args.normal_clients,
        "hostile_codes": dict(codes),
    }
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "phases": results}, f, indent=1)


if __name__ == "__main__":
    main()
