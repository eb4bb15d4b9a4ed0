"""The pool autoscaling policy: exact decisions on constructed metrics, through Ray Serve's
own AutoscalingContext and policy loader."""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingContext, AutoscalingPolicy

from tandem.cluster.autoscaling import PoolAutoscaler

PREFILL = {"queued_prompt_tokens": 100.0, "waiting": 2.0}


def _metrics(**per_replica: list[float]) -> dict[str, dict[str, float]]:
    return {name: {f"r{i}": v for i, v in enumerate(values)} for name, values in
            per_replica.items()}


def test_demand_is_the_most_loaded_signal_in_replicas_worth():
    policy = PoolAutoscaler(PREFILL)
    assert policy.demand({}) is None
    assert policy.demand(_metrics(queued_prompt_tokens=[150, 90], waiting=[1, 0])) == 2.4
    assert policy.demand(_metrics(queued_prompt_tokens=[0, 0], waiting=[5, 4])) == 4.5


def test_up_to_the_demand_down_one_step_and_never_flapping():
    policy = PoolAutoscaler(PREFILL, tolerance=0.1)
    assert policy.decide(3, {}) == 3  # nothing reported yet
    assert policy.decide(1, _metrics(queued_prompt_tokens=[350], waiting=[1])) == 4
    assert policy.decide(1, _metrics(queued_prompt_tokens=[105], waiting=[1])) == 1
    assert policy.decide(1, _metrics(queued_prompt_tokens=[115])) == 2
    assert policy.decide(3, _metrics(queued_prompt_tokens=[0, 0, 0], waiting=[0, 0, 0])) == 2
    # 1.7 replicas' worth on 2: one replica would be over its target: stay at 2
    assert policy.decide(2, _metrics(queued_prompt_tokens=[85, 85])) == 2
    # 0.95 on 2 fits one replica, but not below it by the tolerance (0.9): stay
    assert policy.decide(2, _metrics(queued_prompt_tokens=[50, 45])) == 2
    # 0.8 fits one with room: down
    assert policy.decide(2, _metrics(queued_prompt_tokens=[40, 40])) == 1
    # ...and 0.8 on 1 is under the up threshold (1.1): no flapping back
    assert policy.decide(1, _metrics(queued_prompt_tokens=[80])) == 1
    assert policy.decide(1, _metrics(queued_prompt_tokens=[0])) == 1  # never below one


def test_a_latency_over_its_slo_votes_up_never_down():
    policy = PoolAutoscaler(PREFILL, slo={"ttft_s": 0.5}, tolerance=0.1)
    short_queues = _metrics(queued_prompt_tokens=[20, 10], waiting=[0, 0])
    slow = {**short_queues, "ttft_s": {"r0": 0.7, "r1": 0.5}}  # mean 0.6 > 0.55
    assert policy.decide(2, slow) == 3
    at_slo = {**short_queues, "ttft_s": {"r0": 0.5, "r1": 0.55}}  # within tolerance
    assert policy.decide(2, at_slo) == 1  # light load: down, latency is fine
    fast = {**short_queues, "ttft_s": {"r0": 0.01, "r1": 0.01}}
    assert policy.decide(2, fast) == 1
    # a slow pool is never scaled down, whatever its queues say
    assert policy.decide(2, {**_metrics(queued_prompt_tokens=[0, 0]), "ttft_s": {"r0": 2.0}}) == 3
    with pytest.raises(ValueError, match="slo.running: not a reported metric"):
        PoolAutoscaler(PREFILL, slo={"running": 3})
    with pytest.raises(ValueError, match="targets.ttft_s: not a reported metric"):
        PoolAutoscaler({"ttft_s": 1.0})


def test_decode_scales_up_on_inter_token_latency():
    policy = PoolAutoscaler({"kv_usage": 0.75, "running": 32}, slo={"itl_s": 0.05})
    light = _metrics(kv_usage=[0.2], running=[10])
    assert policy.decide(1, {**light, "itl_s": {"r0": 0.04}}) == 1
    assert policy.decide(1, {**light, "itl_s": {"r0": 0.08}}) == 2
    # no stream yet (0: no gaps seen) is not slow
    assert policy.decide(1, {**light, "itl_s": {"r0": 0.0}}) == 1


def test_prompt_arrival_rate_sizes_the_pool_before_a_queue_builds():
    policy = PoolAutoscaler({**PREFILL, "prompt_tokens_per_s": 1000})
    # queues empty, but 3,400 prompt tokens a second arrive at two replicas: 3.4 worth
    arriving = {**_metrics(queued_prompt_tokens=[0, 0], waiting=[0, 0]),
                "prompt_tokens_per_s": {"r0": 1700.0, "r1": 1700.0}}
    assert policy.decide(2, arriving) == 4


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="targets.tokens: not a reported metric"):
        PoolAutoscaler({"tokens": 1})
    with pytest.raises(ValueError, match="targets.kv_usage must be > 0"):
        PoolAutoscaler({"kv_usage": 0})
    with pytest.raises(ValueError, match="name at least one metric"):
        PoolAutoscaler({})
    with pytest.raises(ValueError, match="tolerance"):
        PoolAutoscaler({"running": 8}, tolerance=1.0)


def test_through_serves_policy_loader_and_context():
    """Serve loads the class from its import path, builds it with policy_kwargs, and
    calls it with an AutoscalingContext; the decision and state round-trip."""
    policy = AutoscalingPolicy(
        policy_function="tandem.cluster.autoscaling:PoolAutoscaler",
        policy_kwargs={"targets": {"kv_usage": 0.5, "running": 8}},
    )
    policy_class = policy.get_policy()
    instance = policy_class(**policy.policy_kwargs)
    deployment = DeploymentID(name="DecodeServer", app_name="tandem")
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=deployment) for i in range(2)]
    ctx = AutoscalingContext(
        deployment_id=deployment, deployment_name="DecodeServer", app_name="tandem",
        current_num_replicas=2, target_num_replicas=2, running_replicas=replicas,
        total_num_requests=10.0, total_queued_requests=0.0,
        aggregated_metrics={"kv_usage": {replicas[0]: 0.9, replicas[1]: 0.8},
                            "running": {replicas[0]: 3.0, replicas[1]: 4.0}},
        raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=1000.0, config=None,
    )
    assert instance(ctx) == (4, {})  # KV: 1.7 / 0.5 = 3.4 replicas' worth
