"""Each pool scales on its own signals, through Ray Serve's custom autoscaling policies.

Every worker replica reports its engine's load (`record_autoscaling_stats` in
cluster/app.py: queued prompt tokens, waiting and running sequences, KV use); Serve's
controller averages each figure over its look-back window per replica and calls the
pool's `PoolAutoscaler` with them. Configured per deployment in the Serve config:

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      policy:
        policy_function: tandem.cluster.autoscaling:PoolAutoscaler
        policy_kwargs: {targets: {queued_prompt_tokens: 512, waiting: 2}}   # prefill

The decision, each control tick:

    demand   = max over the target metrics m of  sum_replicas(m) / target(m)
               (replicas' worth of load; only running replicas report, so a replica
               still starting adds no capacity until it is ready and reporting)
    up       when demand > n * (1 + tolerance): to ceil(demand)
             or when a latency in `slo` averages over its target * (1 + tolerance)
             across the replicas: one replica more
    down     when demand < (n - 1) * (1 - tolerance) and no latency is over its
             target: by one replica
    else     stay at n, the current target

The latency vote matters under admission control (tandem.cluster.admission): the
ingress then refuses the excess instead of queueing it, so queues stay short however
high the demand, and only the time to first token, held near the admission bound, shows
that the pool is saturated. Latency only ever votes up: it is not proportional to the
replica count, and scaling down on it would flap.

Serve then applies the deployment's own `upscale_delay_s` / `downscale_delay_s` (a wish
must hold that long before the target moves) and min/max replicas, as it does for every
custom policy. Going down only when n - 1 replicas would still sit below the target by
the tolerance leaves a gap between the two thresholds, so a pool of 1 or 2 replicas does
not flap: after a step down the remaining replicas are under the up threshold by
construction.

A queue alone reacts late (only once a backlog has built) and over-shoots (the backlog,
not the demand, sets the count, bench/RESULTS.md "Cluster sizing by simulation"): the
prefill pool also targets `prompt_tokens_per_s`, the prompt tokens arriving at a replica
per second over the last 5 s, against what a replica computes with headroom.

Prefill scales on queued prompt tokens (work admitted but not yet computed, which is
what TTFT waits on) and waiting requests, with `slo: {ttft_s: ...}`; decode on KV-cache
use and running sequences (what inter-token latency and admission depend on), with
`slo: {itl_s: ...}` (the time between a stream's tokens, 90th percentile). The module
imports no torch and nothing of Ray at import time: Serve pickles it by value into its
controller.
"""

from __future__ import annotations

import math
from typing import Any

# The figures a worker replica reports: load (summed over replicas for `targets`) and
# latencies (90th percentiles over the last 5 s, for `slo`): its time from arrival to first
# token, and (decode) the time between a stream's tokens.
LOAD_METRICS = ("queued_prompt_tokens", "waiting", "running", "kv_usage", "prompt_tokens_per_s")
LATENCY_METRICS = ("ttft_s", "itl_s")
REPORTED_METRICS = LOAD_METRICS + LATENCY_METRICS


class PoolAutoscaler:
    """A Serve autoscaling policy (class form: built once with the config's
    `policy_kwargs`, then called every control tick with an AutoscalingContext)."""

    def __init__(
        self,
        targets: dict[str, float],
        slo: dict[str, float] | None = None,
        tolerance: float = 0.1,
    ) -> None:
        if not targets:
            raise ValueError("autoscaling policy_kwargs.targets: name at least one metric")
        for field, given, allowed in (("targets", targets, LOAD_METRICS),
                                      ("slo", slo or {}, LATENCY_METRICS)):
            for name, value in given.items():
                if name not in allowed:
                    raise ValueError(
                        f"autoscaling policy_kwargs.{field}.{name}: not a reported metric "
                        f"(one of {', '.join(allowed)})"
                    )
                if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                    raise ValueError(f"autoscaling policy_kwargs.{field}.{name} must be > 0")
        if not 0 <= tolerance < 1:
            raise ValueError("autoscaling policy_kwargs.tolerance must be in [0, 1)")
        self.targets = dict(targets)
        self.slo = dict(slo or {})
        self.tolerance = tolerance

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        return self.decide(ctx.target_num_replicas, ctx.aggregated_metrics or {}), {}

    def demand(self, metrics: dict[str, dict[Any, float]]) -> float | None:
        """Replicas' worth of load, or None while no replica has reported."""
        ratios = [
            sum(metrics[name].values()) / target
            for name, target in self.targets.items()
            if metrics.get(name)
        ]
        return max(ratios) if ratios else None

    def slow(self, metrics: dict[str, dict[Any, float]]) -> bool:
        """Whether a latency averages over its SLO (with the tolerance) across replicas."""
        for name, target in self.slo.items():
            values = list((metrics.get(name) or {}).values())
            if values and sum(values) / len(values) > target * (1 + self.tolerance):
                return True
        return False

    def decide(self, current: int, metrics: dict[str, dict[Any, float]]) -> int:
        """The replica count this load asks for, starting from the current target."""
        demand = self.demand(metrics)
        slow = self.slow(metrics)
        if demand is not None and demand > current * (1 + self.tolerance):
            return max(current + 1, math.ceil(demand))
        if slow:
            return current + 1
        if (
            demand is not None
            and current > 1
            and demand < (current - 1) * (1 - self.tolerance)
        ):
            return current - 1
        return current
