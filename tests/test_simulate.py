"""The cluster-sizing simulation: exact timings of a lone request, speed interpolation,
and the real autoscaling policy sizing the pools of a load that needs more than one
replica, against static pools at the same peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.cluster.loadtest.simulate import (
    PoolPlan,
    ReplicaSpeed,
    SimConfig,
    Simulation,
    compare,
)


def test_step_time_is_linear_between_and_beyond_the_measured_batches():
    speed = ReplicaSpeed(decode_steps=((1, 0.01), (3, 0.03), (7, 0.05)))
    assert speed.step_time(1) == 0.01
    assert speed.step_time(2) == pytest.approx(0.02)
    assert speed.step_time(5) == pytest.approx(0.04)
    assert speed.step_time(9) == pytest.approx(0.06)  # the last slope goes on
    with pytest.raises(ValueError, match="increasing batches"):
        ReplicaSpeed(decode_steps=((4, 0.01), (2, 0.02)))


def test_a_lone_request_takes_prefill_then_one_step_a_token():
    speed = ReplicaSpeed(prefill_tok_s=1000, decode_steps=((1, 0.01),), max_num_seqs=4)
    report = Simulation(SimConfig(speed=speed), static=(1, 1)).run([(0.0, 500, 3)])
    # prefill ends at 0.5 s; tokens at 0.51, 0.52, 0.53
    assert report["ttft_p50_s"] == pytest.approx(0.51)
    assert report["itl_p50_s"] == pytest.approx(0.01)
    assert report["duration_s"] == pytest.approx(0.53)
    assert report["attainment"] == 1.0
    assert report["gpu_hours"] == pytest.approx(2 * 0.53 / 3600)


def test_autoscaling_sizes_the_decode_pool_and_saves_gpu_time():
    # 10 requests a second, 100 tokens each at 10 ms a step: about 10 running; a replica
    # holds 4, the policy aims at 3 running each
    speed = ReplicaSpeed(prefill_tok_s=100_000, decode_steps=((1, 0.01),), max_num_seqs=4)
    config = SimConfig(
        speed=speed,
        prefill=PoolPlan({"queued_prompt_tokens": 10_000}, max_replicas=2),
        decode=PoolPlan({"running": 3}, max_replicas=6, upscale_delay_s=0,
                        downscale_delay_s=20),
        control_period_s=1.0,
        startup_s=5.0,
        slo_ttft_s=2.0,
    )
    rows = [(i / 10, 64, 100) for i in range(600)]  # 60 s
    rows += [(300 + i / 10, 64, 100) for i in range(20)]  # a lull, then a little more
    result = compare(config, rows)
    auto, static = result["autoscaled"], result["static_at_peak"]
    assert auto["peak"][0] == 1 and 3 <= auto["peak"][1] <= 6
    assert static["peak"] == auto["peak"]
    # the pool shrank during the lull: fewer GPU-hours than static pools at the peak
    assert [n for _, n in auto["decode_replicas"]][-1] < auto["peak"][1]
    assert result["gpu_hours_saved"] > 0.2
    assert static["attainment"] == 1.0 and auto["attainment"] > 0.5


def test_loadtest_simulate_command(tmp_path):
    env = dict(os.environ)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "tandem"), "loadtest", "--simulate", "--out",
         str(tmp_path), "--workload", "synthetic", "--isl", "1024", "--osl", "64",
         "--schedule", "30s@5,30s@5->60", "--max-requests", "1500"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    brief = json.loads(done.stdout)
    assert brief["autoscaled"]["requests"] == brief["static_at_peak"]["requests"] > 800
    saved = json.loads((tmp_path / "simulation.json").read_text())
    assert saved["autoscaled"]["decode_replicas"][0] == [0.0, 1]
    assert (tmp_path / "simulation.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run(
        [str(Path(sys.executable).parent / "tandem"), "loadtest", "--simulate", "--out",
         str(tmp_path), "--workload", "chat"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "open-loop workloads only" in bad.stderr
