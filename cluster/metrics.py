"""Prometheus metrics of the deployments, through Ray's metrics API (ray.util.metrics).

Every replica records into Ray's per-node metrics agent, which Prometheus scrapes (Ray
prefixes each name with `ray_`). Tags say where a sample comes from: `role` (ingress,
prefill, decode) and `replica` (the Serve replica id).

    ingress:  tandem_ttft_seconds, tandem_inter_token_seconds, tandem_requests_total
              {outcome}, tandem_waiting_requests, tandem_placement_fallbacks_total{pool},
              tandem_kv_transfer_seconds (per transferred request)
    router:   tandem_placement_decisions_total{pool, policy, reason},
              tandem_disagg_decisions_total{reason}, tandem_placement_imbalance{pool},
              tandem_prefix_{prompt,cached,oracle}_tokens_total{pool},
              tandem_prefix_index_blocks
              (prefix hit rate of a pool = cached / prompt tokens; oracle / prompt is
              what a router choosing by cache alone could have reused there)
    workers:  tandem_running, tandem_waiting, tandem_queued_prompt_tokens,
              tandem_kv_usage, tandem_generated_tokens_total, tandem_preemptions_total
    decode:   tandem_kv_transfers_total, tandem_kv_transfer_seconds_total,
              tandem_kv_transfer_bytes_total, tandem_prefill_fallbacks_total

Workers expose their engine's figures as a flat dict (`metrics()`); WorkerMetrics turns
the cumulative ones into counter increments, so a scrape sees proper counters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from ray.util.metrics import Counter, Gauge, Histogram

M = TypeVar("M", Counter, Gauge, Histogram)

# Seconds; first tokens span queueing and prefill, later ones a decode step.
_TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
_TRANSFER_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]
OUTCOMES = ("finished", "cancelled", "rejected", "failed")


def _tagged(metric: M, tags: Mapping[str, str]) -> M:
    """The metric with this replica's tags as defaults (every metric here carries them)."""
    metric.set_default_tags(dict(tags))
    return metric


class IngressMetrics:
    """What only the ingress sees: latency as the client sees it, placement fallbacks."""

    def __init__(self, replica_id: str) -> None:
        tags = {"role": "ingress", "replica": replica_id}
        keys = ("role", "replica")
        self._ttft = _tagged(
            Histogram(
                "tandem_ttft_seconds",
                description="Arrival at the ingress to the first streamed token.",
                boundaries=_TTFT_BUCKETS,
                tag_keys=keys,
            ),
            tags,
        )
        self._itl = _tagged(
            Histogram(
                "tandem_inter_token_seconds",
                description="Time between consecutive streamed tokens of a request.",
                boundaries=_ITL_BUCKETS,
                tag_keys=keys,
            ),
            tags,
        )
        self._transfer = _tagged(
            Histogram(
                "tandem_kv_transfer_seconds",
                description="Moving one prompt's KV from its prefill to its decode worker.",
                boundaries=_TRANSFER_BUCKETS,
                tag_keys=keys,
            ),
            tags,
        )
        self._requests = _tagged(
            Counter(
                "tandem_requests_total",
                description="Requests by outcome (finished, cancelled, rejected, failed).",
                tag_keys=(*keys, "outcome"),
            ),
            tags,
        )
        self._fallbacks = _tagged(
            Counter(
                "tandem_placement_fallbacks_total",
                description="Requests served by another replica than placement chose.",
                tag_keys=(*keys, "pool"),
            ),
            tags,
        )
        self._migrations = _tagged(
            Counter(
                "tandem_migrations_total",
                description="Streams moved off a failed decode replica, by reason (died, "
                "failed, ended, stalled).",
                tag_keys=(*keys, "reason"),
            ),
            tags,
        )
        self._waiting = _tagged(
            Gauge(
                "tandem_waiting_requests",
                description="Requests admitted by this ingress without a first token yet.",
                tag_keys=keys,
            ),
            tags,
        )
        self.router = RouterMetrics(replica_id)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def inter_token(self, seconds: float, tokens: int) -> None:
        """`tokens` tokens arrived together `seconds` after the previous ones."""
        for _ in range(tokens):
            self._itl.observe(seconds / tokens)

    def kv_transfer(self, seconds: float) -> None:
        self._transfer.observe(seconds)

    def request_done(self, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        self._requests.inc(1, tags={"outcome": outcome})

    def migration(self, reason: str) -> None:
        self._migrations.inc(1, tags={"reason": reason})

    def placement_fallback(self, pool: str) -> None:
        self._fallbacks.inc(1, tags={"pool": pool})

    def waiting(self, count: int) -> None:
        self._waiting.set(count)


POOLS = ("prefill", "decode")


class RouterMetrics:
    """The ingress's placement decisions and how much prefix cache they reused."""

    def __init__(self, replica_id: str) -> None:
        tags = {"role": "ingress", "replica": replica_id}
        keys = ("role", "replica")
        self._decisions = _tagged(
            Counter(
                "tandem_placement_decisions_total",
                description="Replica choices by pool, policy and the policy's reason.",
                tag_keys=(*keys, "pool", "policy", "reason"),
            ),
            tags,
        )
        self._disagg = _tagged(
            Counter(
                "tandem_disagg_decisions_total",
                description="Prompts sent to a prefill replica (remote) or kept on the decode "
                "replica, by reason.",
                tag_keys=(*keys, "reason"),
            ),
            tags,
        )
        self._imbalance = _tagged(
            Gauge(
                "tandem_placement_imbalance",
                description="Outstanding requests of a pool's busiest replica minus its idlest, "
                "as of the latest placement.",
                tag_keys=(*keys, "pool"),
            ),
            tags,
        )
        self._tokens = {
            kind: _tagged(
                Counter(
                    f"tandem_prefix_{kind}_tokens_total",
                    description=description,
                    tag_keys=(*keys, "pool"),
                ),
                tags,
            )
            for kind, description in (
                ("prompt", "Prompt tokens of finished requests, by the pool that computed them."),
                ("cached", "Of those, tokens the computing worker found in its prefix cache."),
                (
                    "oracle",
                    "Of those, the longest prefix any replica of that pool held at placement.",
                ),
            )
        }
        self._index_blocks = _tagged(
            Gauge(
                "tandem_prefix_index_blocks",
                description="Blocks in this ingress's prefix index, over all workers and groups.",
                tag_keys=keys,
            ),
            tags,
        )

    def decision(self, pool: str, policy: str, reason: str) -> None:
        self._decisions.inc(1, tags={"pool": pool, "policy": policy, "reason": reason})

    def disagg(self, reason: str) -> None:
        self._disagg.inc(1, tags={"reason": reason})

    def imbalance(self, pool: str, value: int) -> None:
        self._imbalance.set(value, tags={"pool": pool})

    def prefix_tokens(self, pool: str, prompt: int, cached: int, oracle: int) -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        for kind, value in (("prompt", prompt), ("cached", cached), ("oracle", oracle)):
            if value:
                self._tokens[kind].inc(value, tags={"pool": pool})

    def index_blocks(self, count: int) -> None:
        self._index_blocks.set(count)


# Engine figures exported as gauges: name in Worker.metrics() -> (metric, description).
_GAUGES = {
    "running": ("tandem_running", "Sequences in the engine's running batch."),
    "waiting": ("tandem_waiting", "Sequences admitted by the engine, not yet scheduled."),
    "queued_prompt_tokens": (
        "tandem_queued_prompt_tokens",
        "Prompt tokens admitted by the engine, not yet computed.",
    ),
    "kv_usage": ("tandem_kv_usage", "Fraction of KV blocks held by requests (fullest group)."),
}
# Cumulative engine figures exported as counters.
_COUNTERS = {
    "generated_tokens": ("tandem_generated_tokens_total", "Tokens sampled by the engine."),
    "preemptions": ("tandem_preemptions_total", "Sequences preempted for lack of KV blocks."),
    "transfers": ("tandem_kv_transfers_total", "Prompt KV transfers received."),
    "transfer_seconds": (
        "tandem_kv_transfer_seconds_total",
        "Seconds spent receiving prompt KV transfers.",
    ),
    "transfer_bytes": ("tandem_kv_transfer_bytes_total", "Bytes of prompt KV received."),
    "fallbacks": (
        "tandem_prefill_fallbacks_total",
        "Prompts prefilled locally after their KV transfer failed or missed its deadline.",
    ),
}


class WorkerMetrics:
    """A prefill or decode worker's engine figures, refreshed by `update`."""

    def __init__(self, role: str, replica_id: str) -> None:
        tags = {"role": role, "replica": replica_id}
        keys = ("role", "replica")
        self._gauges: dict[str, Gauge] = {}
        for key, (name, description) in _GAUGES.items():
            self._gauges[key] = _tagged(Gauge(name, description=description, tag_keys=keys), tags)
        self._counters: dict[str, Counter] = {}
        for key, (name, description) in _COUNTERS.items():
            self._counters[key] = _tagged(
                Counter(name, description=description, tag_keys=keys), tags
            )
        self._last: dict[str, float] = {}

    def update(self, figures: Mapping[str, float]) -> None:
        """Set the gauges, and add each cumulative figure's growth since the last call;
        figures this worker does not report (a prefill worker's transfers) are skipped."""
        for key, gauge in self._gauges.items():
            if key in figures:
                gauge.set(float(figures[key]))
        for key, counter in self._counters.items():
            if key not in figures:
                continue
            value = float(figures[key])
            growth = value - self._last.get(key, 0.0)
            if growth > 0:
                counter.inc(growth)
            self._last[key] = value
