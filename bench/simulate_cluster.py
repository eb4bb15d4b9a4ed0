"""Size a gpt-oss-20b cluster on H100s for a Mooncake-shaped day compressed to an hour.

    .venv/bin/python -m bench.simulate_cluster [--out bench/results/simulate_cluster]

Writes a trace in Mooncake's format with the shape of its published FAST'25 sample (a
shared system block, prompts of 2k-16k tokens, lognormal around 6k; answers lognormal
around 400 tokens; arrivals a Poisson process whose rate rises from 1 to 12 requests a
second and falls back, a day's curve in an hour), replays it through
`tandem loadtest --simulate` (tandem.cluster.loadtest.simulate: the real PoolAutoscaler,
replica speeds from bench/RESULTS.md) and prints the comparison with static pools sized
at the autoscaled peak.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path

from tandem.cluster.cli import main as tandem_main

BLOCK = 512


def write_trace(path: Path, seed: int = 0, hours: float = 1.0) -> int:
    rng = random.Random(seed)
    t, n, next_hash = 0.0, 0, 1
    span = hours * 3600
    with open(path, "w", encoding="utf-8") as out:
        while True:
            rate = 1 + 11 * math.sin(math.pi * t / span) ** 2  # 1 -> 12 -> 1 per second
            t += rng.expovariate(rate)
            if t >= span:
                return n
            isl = int(min(16384, max(2048, rng.lognormvariate(math.log(6000), 0.5))))
            osl = int(min(2048, max(16, rng.lognormvariate(math.log(400), 0.6))))
            blocks = math.ceil(isl / BLOCK)
            hashes = [0] + list(range(next_hash, next_hash + blocks - 1))
            next_hash += blocks - 1
            row = {"timestamp": int(t * 1000), "input_length": isl, "output_length": osl,
                   "hash_ids": hashes}
            out.write(json.dumps(row) + "\n")
            n += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/simulate_cluster")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        count = write_trace(trace)
        print(json.dumps({"trace_requests": count}))
        try:
            tandem_main(["loadtest", "--simulate", "--workload", "mooncake", "--trace",
                         str(trace), "--max-requests", str(count), "--out", args.out,
                         "--slo-ttft", "2.0", "--slo-itl", "0.05"])
        except SystemExit as done:
            if done.code:
                raise


if __name__ == "__main__":
    main()
