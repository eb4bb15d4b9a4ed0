"""bench/router_sim.py's JSON as the markdown tables of bench/RESULTS.md, with issue 20's
acceptance checked per cell.

    .venv/bin/python bench/router_sim_report.py GRID.json [--goodput SWEEP.json ...]

Per cell (workload, pool, cache, load 0.8): the median over the seeds that ran of each
router's prefix hit rate and TTFT p99, the seeds and the fewest measured requests of a
run. Acceptance (the issue's): hit rate >= 0.95 x the clairvoyant router's at medium and
ample caches, >= 0.90 x at tight and scarce; TTFT p99 <= 1.2 x the best practical
router's (round-robin, least-loaded, Ray-style, SGLang-style); without reuse, p99 <=
1.1 x round-robin's. Goodput (--goodput, a load sweep): the highest load whose p99 TTFT
is under 2 s; >= 0.8 x the clairvoyant router's (>= round-robin's without reuse).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

PRACTICAL = ("round_robin", "least_loaded", "ray", "sglang")
ORDER = ("prefix_aware", "clairvoyant", "round_robin", "least_loaded", "ray", "sglang")
CACHES = ("tight", "scarce", "medium", "ample")
GOODPUT_P99_S = 2.0


def _cells(rows: list[dict]) -> dict[tuple, dict[str, list[dict]]]:
    cells: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["workload"], r["replicas"], r["cache"], r["load"])
        cells[key][r["router"]].append(r)
    return cells


def _median(runs: list[dict], field: str) -> float:
    return statistics.median(r[field] for r in runs)


def _sort_key(key: tuple) -> tuple:
    workload, pool, cache, load = key
    order = ("chat", "agentic", "rag", "no_reuse")
    return (order.index(workload) if workload in order else 9, pool, CACHES.index(cache), load)


def grid_tables(rows: list[dict]) -> tuple[str, dict[str, int]]:
    """The grid's table and counts of cells meeting / missing each criterion."""
    cells = _cells(rows)
    routers = [r for r in ORDER if any(r in c for c in cells.values())]
    head = " | ".join(f"{r} hit / p99" for r in routers)
    lines = [
        f"| workload | pool | cache | seeds | min req | {head} | hit / clairv. "
        "| p99 / best practical |",
        "|---|---:|---|---:|---:|" + "---|" * len(routers) + "---:|---:|",
    ]
    verdict = defaultdict(int)
    for key in sorted(cells, key=_sort_key):
        by = cells[key]
        workload, pool, cache, _ = key
        seeds = min(len(v) for v in by.values())
        fewest = min(r["requests"] for v in by.values() for r in v)
        figures = []
        for r in routers:
            if r in by:
                figures.append(
                    f"{_median(by[r], 'hit_rate'):.3f} / {_median(by[r], 'ttft_p99_s'):.2f}"
                )
            else:
                figures.append("-")
        hit_ratio = p99_ratio = "-"
        if "prefix_aware" in by:
            pa_p99 = _median(by["prefix_aware"], "ttft_p99_s")
            if workload == "no_reuse":
                if "round_robin" in by:
                    ratio = pa_p99 / _median(by["round_robin"], "ttft_p99_s")
                    ok = ratio <= 1.1
                    verdict["p99 ok" if ok else "p99 miss"] += 1
                    p99_ratio = f"{ratio:.2f} (RR){'' if ok else ' **miss**'}"
            else:
                if "clairvoyant" in by and _median(by["clairvoyant"], "hit_rate") > 0:
                    ratio = _median(by["prefix_aware"], "hit_rate") / _median(
                        by["clairvoyant"], "hit_rate"
                    )
                    ok = ratio >= (0.95 if cache in ("medium", "ample") else 0.90)
                    verdict["hit ok" if ok else "hit miss"] += 1
                    hit_ratio = f"{ratio:.3f}{'' if ok else ' **miss**'}"
                best = [_median(by[r], "ttft_p99_s") for r in PRACTICAL if r in by]
                if best:
                    ratio = pa_p99 / min(best)
                    ok = ratio <= 1.2
                    verdict["p99 ok" if ok else "p99 miss"] += 1
                    p99_ratio = f"{ratio:.2f}{'' if ok else ' **miss**'}"
        lines.append(
            f"| {workload} | {pool} | {cache} | {seeds} | {fewest} | {' | '.join(figures)} "
            f"| {hit_ratio} | {p99_ratio} |"
        )
    return "\n".join(lines), dict(verdict)


def goodput_table(rows: list[dict]) -> str:
    """Highest load with p99 TTFT under 2 s, per workload / pool / cache and router."""
    series: dict[tuple, dict[str, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        key = (r["workload"], r["replicas"], r["cache"])
        series[key][r["router"]].setdefault(r["load"], [])
        series[key][r["router"]][r["load"]].append(r["ttft_p99_s"])
    routers = [r for r in ORDER if any(r in s for s in series.values())]
    lines = [
        f"| workload | pool | cache | {' | '.join(routers)} | prefix_aware / yardstick |",
        "|---|---:|---|" + "---:|" * len(routers) + "---:|",
    ]
    for key in sorted(series, key=lambda k: _sort_key((*k, 0))):
        good, shown = {}, {}
        ran = sorted({load for by_load in series[key].values() for load in by_load})
        for router, by_load in series[key].items():
            best = 0.0
            for load in ran:
                if load in by_load and statistics.median(by_load[load]) < GOODPUT_P99_S:
                    best = load
                else:
                    break
            good[router] = best
            # Every load of the sweep under 2 s: at least the last; none: below the first.
            if best == ran[-1]:
                shown[router] = f">= {best:.1f}"
            else:
                shown[router] = f"{best:.1f}" if best else f"< {ran[0]:.1f}"
        cells = [shown.get(r, "-") for r in routers]
        yardstick, factor = ("round_robin", 1.0) if key[0] == "no_reuse" else ("clairvoyant", 0.8)
        ratio = "-"
        if "prefix_aware" in good and good.get(yardstick):
            value = good["prefix_aware"] / good[yardstick]
            ratio = f"{value:.2f} ({yardstick}){'' if value >= factor else ' **miss**'}"
        elif good.get("prefix_aware") and yardstick in good:
            ratio = f"above ({yardstick} below the sweep)"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {' | '.join(cells)} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grid")
    parser.add_argument("--goodput", nargs="*", default=[])
    args = parser.parse_args()
    rows = json.loads(Path(args.grid).read_text())["rows"]
    table, verdict = grid_tables(rows)
    print(table)
    print(f"\ncells: {verdict}")
    decision = [r for r in rows if "decision_p99_ms" in r]
    if decision:
        p50 = statistics.median(r["decision_p50_ms"] for r in decision)
        p99 = [r["decision_p99_ms"] for r in decision]
        print(
            f"decision (IngressPlacement.place() in the simulation): median of runs' p50 "
            f"{p50:.3f} ms; runs' p99 median {statistics.median(p99):.3f} ms, max {max(p99):.3f} ms"
        )
    if args.goodput:
        sweep = [row for path in args.goodput for row in json.loads(Path(path).read_text())["rows"]]
        print()
        print(goodput_table(sweep))


if __name__ == "__main__":
    main()
