"""bench/router_sim.py --quick as it is run (a subprocess from the repository root): every
run checks itself at its end (all requests finished, block pools consistent, the router's
index, fed only by block events, equal to the caches: Simulation.check), the same seed
gives the same figures, and the figures order as they must on a workload with reuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quick(tmp_path: Path, name: str, *args: str) -> list[dict]:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "bench.router_sim", "--quick", "--jobs", "1", "--json", str(out)]
    # Shorter than --quick alone: a test checks behaviour, not figures worth recording.
    cmd += ["--requests", "200", "--warmup-s", "10"]
    done = subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def _figures(rows: list[dict]) -> list[tuple]:
    return [(r["router"], r["requests"], r["hit_rate"], r["ttft_p99_s"]) for r in rows]


def test_quick_chat_is_reproducible_and_prefix_routers_reuse_more(tmp_path):
    args = (
        "--workloads",
        "chat",
        "--caches",
        "medium",
        "--routers",
        "round_robin,prefix_aware,clairvoyant,sglang",
    )
    first = _quick(tmp_path, "a", *args)
    assert _figures(first) == _figures(_quick(tmp_path, "b", *args))
    hit = {r["router"]: r["hit_rate"] for r in first}
    assert all(r["requests"] > 100 for r in first)
    assert hit["prefix_aware"] > hit["round_robin"] + 0.05
    assert hit["clairvoyant"] > hit["round_robin"] + 0.05
    decisions = next(r["decisions"] for r in first if r["router"] == "prefix_aware")
    assert decisions.get("prefix", 0) > sum(decisions.values()) / 2


def test_quick_no_reuse_reuses_nothing(tmp_path):
    rows = _quick(tmp_path, "d", "--workloads", "no_reuse", "--routers", "round_robin,prefix_aware")
    assert [r["hit_rate"] for r in rows] == [0.0, 0.0]
