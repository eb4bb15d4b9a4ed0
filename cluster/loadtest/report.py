"""What a load test saw: latency percentiles, goodput, cache hits, errors, replicas.

    summarize(records, ...)   -> the JSON-able summary (also the plots' and HTML's input)
    write_report(out_dir, ...) results.json, ttft_itl_cdf.png, latency_over_time.png,
                               throughput.png, replicas.png, report.html

Goodput follows DistServe: a request counts when it completed with TTFT <= the TTFT SLO
and a mean inter-token time (TPOT) <= the ITL SLO; attainment is the share of all sent
requests that count (errors and refusals miss), goodput the counted requests per second
of the run. DistServe calls a rate sustainable at 90% attainment; `meets_90` says whether
this run did. Per time window the same figures show where a ramp stopped meeting it.

Plots need matplotlib (the `loadtest` extra); without it the JSON and HTML are still
written and the HTML says the plots are missing.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tandem.cluster.loadtest.driver import RequestRecord


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 1.0
    itl_s: float = 0.05

    def met_by(self, record: RequestRecord) -> bool:
        if not record.ok or record.ttft_s is None or record.ttft_s > self.ttft_s:
            return False
        return record.tpot_s is None or record.tpot_s <= self.itl_s


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "count": len(values),
        "mean": sum(values) / len(values) if values else None,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


def _window(records: Sequence[RequestRecord], slo: SLO, span_s: float) -> dict:
    done = [r for r in records if r.ok]
    met = sum(1 for r in records if slo.met_by(r))
    return {
        "sent": len(records),
        "completed": len(done),
        "errors": len(records) - len(done),
        "offered_rps": len(records) / span_s,
        "ttft_p50_s": percentile([r.ttft_s for r in done if r.ttft_s is not None], 50),
        "ttft_p99_s": percentile([r.ttft_s for r in done if r.ttft_s is not None], 99),
        "attainment": met / len(records) if records else None,
        "goodput_rps": met / span_s,
    }


def summarize(
    records: Sequence[RequestRecord],
    slo: SLO,
    *,
    window_s: float = 5.0,
    replicas: Sequence[tuple[float, dict[str, int]]] = (),
    config: dict | None = None,
) -> dict:
    """The run's figures. Rates are over the span from the first send to the last end."""
    if not records:
        raise ValueError("no requests were sent: nothing to report")
    start = min(r.sent_s for r in records)
    end = max(r.end_s if r.end_s is not None else r.sent_s for r in records)
    span = max(end - start, 1e-9)
    done = [r for r in records if r.ok]
    met = sum(1 for r in records if slo.met_by(r))
    prompt = sum(r.prompt_tokens for r in done)
    windows = []
    t = start
    while t < end or not windows:
        inside = [r for r in records if t <= r.sent_s < t + window_s]
        windows.append({"start_s": t - start, **_window(inside, slo, window_s)})
        t += window_s
    return {
        "config": config or {},
        "slo": asdict(slo),
        "duration_s": span,
        "sent": len(records),
        "completed": len(done),
        "errors_by_status": dict(Counter(r.status for r in records if not r.ok)),
        "request_rps": len(done) / span,
        "output_tok_s": sum(r.output_tokens for r in done) / span,
        "ttft_s": _stats([r.ttft_s for r in done if r.ttft_s is not None]),
        "itl_s": _stats([gap for r in done for gap in r.itl_s]),
        "tpot_s": _stats([r.tpot_s for r in done if r.tpot_s is not None]),
        "e2e_s": _stats([r.e2e_s for r in done if r.e2e_s is not None]),
        "error_latency_s": _stats([r.e2e_s for r in records if not r.ok and r.e2e_s is not None]),
        "attainment": met / len(records),
        "meets_90": met / len(records) >= 0.9,
        "goodput_rps": met / span,
        "prefix_hit_rate": sum(r.cached_tokens for r in done) / prompt if prompt else 0.0,
        "windows": windows,
        "replicas": [{"t_s": t, **counts} for t, counts in replicas],
    }


# ------------------------------------------------------------------------ the files


def _plots(records: Sequence[RequestRecord], summary: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        written.append(out / name)

    done = [r for r in records if r.ok]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (label, values) in zip(axes, (
        ("TTFT (s)", sorted(r.ttft_s for r in done if r.ttft_s is not None)),
        ("inter-token latency (s)", sorted(g for r in done for g in r.itl_s)),
    ), strict=True):
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests" if label.startswith("TTFT") else "fraction of gaps")
        ax.grid(alpha=0.3)
    save(fig, "ttft_itl_cdf.png")

    windows = summary["windows"]
    starts = [w["start_s"] for w in windows]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for key, label in (("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99")):
        ax.plot(starts, [w[key] if w[key] is not None else math.nan for w in windows],
                marker=".", label=label)
    ax.axhline(summary["slo"]["ttft_s"], color="grey", linestyle="--", label="TTFT SLO")
    ax.set_xlabel("time (s, by send time)")
    ax.set_ylabel("seconds")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "latency_over_time.png")

    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.plot(starts, [w["offered_rps"] for w in windows], marker=".", label="offered req/s")
    ax.plot(starts, [w["goodput_rps"] for w in windows], marker=".", label="goodput req/s")
    ax.plot(starts, [w["errors"] / (starts[1] - starts[0] if len(starts) > 1 else 1)
                     for w in windows], marker=".", label="errors/s")
    ax.set_xlabel("time (s)")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "throughput.png")

    if summary["replicas"]:
        fig, ax = plt.subplots(figsize=(9, 3.2))
        roles = sorted({k for row in summary["replicas"] for k in row if k != "t_s"})
        for role in roles:
            ax.step([row["t_s"] for row in summary["replicas"]],
                    [row.get(role, 0) for row in summary["replicas"]], where="post", label=role)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("replicas")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "replicas.png")
    return written


def _html(summary: dict, images: list[Path]) -> str:
    def fmt(v) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    rows = "".join(
        f"<tr><th>{name}</th>" + "".join(f"<td>{fmt(s[k])}</td>" for k in
                                          ("count", "mean", "p50", "p90", "p99", "max"))
        + "</tr>"
        for name, s in (("TTFT s", summary["ttft_s"]), ("ITL s", summary["itl_s"]),
                        ("TPOT s", summary["tpot_s"]), ("end to end s", summary["e2e_s"]))
    )
    head = {k: summary[k] for k in ("duration_s", "sent", "completed", "request_rps",
                                    "output_tok_s", "attainment", "goodput_rps",
                                    "prefix_hit_rate")}
    facts = "".join(f"<tr><th>{k}</th><td>{fmt(v)}</td></tr>" for k, v in head.items())
    errors = html.escape(json.dumps(summary["errors_by_status"]))
    config = html.escape(json.dumps(summary["config"], indent=1))
    pictures = "".join(
        f'<p><img alt="{p.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"></p>' for p in images
    ) or "<p>(no plots: install the loadtest extra, which brings matplotlib)</p>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>tandem load test</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;"
        "text-align:right}</style></head><body><h1>tandem load test</h1>"
        f"<table>{facts}</table><p>errors by status: {errors}</p>"
        "<table><tr><th></th><th>count</th><th>mean</th><th>p50</th><th>p90</th>"
        f"<th>p99</th><th>max</th></tr>{rows}</table>{pictures}"
        f"<h2>configuration</h2><pre>{config}</pre></body></html>"
    )


def write_report(out_dir: str | Path, records: Sequence[RequestRecord], summary: dict) -> Path:
    """Writes results.json (summary and every request), the plots and report.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"summary": summary, "requests": [asdict(r) for r in records]}
    (out / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    images = _plots(records, summary, out)
    (out / "report.html").write_text(_html(summary, images), encoding="utf-8")
    return out
