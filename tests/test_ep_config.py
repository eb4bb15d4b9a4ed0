"""`args.expert_parallel` of the Serve config: parsed per pool into ExpertParallelConfig,
bad values named by their path, and a worker deployment of N ranks given (or refused
without) a CPU per rank, and on CUDA exactly a GPU per rank."""

from __future__ import annotations

import copy

import pytest

from tandem.cluster.app import build_application
from tandem.cluster.config import (
    ConfigError,
    load_app_config,
    parse_app_config,
    worker_actor_options,
)
from tandem.workers.engine.llm_engine import EngineConfig
from tandem.workers.expert_parallel.config import ExpertParallelConfig


def _config(expert_parallel=None, device="cpu", actors=None) -> dict:
    """A config with the given expert_parallel args and per-deployment ray_actor_options
    (None: the file names none)."""
    args = {"model": "/m", "engine": {"prefill": {"device": device}, "decode": {"device": device}}}
    if expert_parallel is not None:
        args["expert_parallel"] = expert_parallel
    deployments = [{"name": "Ingress", "num_replicas": 1}]
    for name in ("PrefillServer", "DecodeServer"):
        entry = {"name": name, "num_replicas": 1}
        if actors and name in actors:
            entry["ray_actor_options"] = actors[name]
        deployments.append(entry)
    return {
        "applications": [
            {
                "name": "tandem",
                "import_path": "tandem.cluster.app:build_app",
                "args": args,
                "deployments": deployments,
            }
        ]
    }


def test_default_file_runs_one_rank_per_worker():
    settings = load_app_config().settings
    assert settings.prefill_ep == settings.decode_ep == ExpertParallelConfig()
    assert worker_actor_options(settings.prefill_ep, settings.prefill_engine) == {}


def test_each_pool_gets_its_own_expert_parallelism():
    ep = {"decode": {"size": 2, "placement": "round_robin", "dispatch": "all_to_all"}}
    settings = parse_app_config(_config(ep)).settings
    assert settings.prefill_ep == ExpertParallelConfig()
    assert settings.decode_ep == ExpertParallelConfig(
        size=2, placement="round_robin", dispatch="all_to_all"
    )


@pytest.mark.parametrize(
    ("ep", "field"),
    [
        ({"prefill": {"size": 0}}, "applications[0].args.expert_parallel.prefill.size"),
        ({"decode": {"placement": "random"}}, "applications[0].args.expert_parallel.decode"),
        ({"decode": {"dispatch": "broadcast"}}, "applications[0].args.expert_parallel.decode"),
        ({"prefill": {"ranks": 2}}, "applications[0].args.expert_parallel.prefill.ranks"),
        ({"prefill": {"timeout_s": 0}}, "applications[0].args.expert_parallel.prefill.timeout_s"),
    ],
)
def test_bad_values_name_their_field(ep, field):
    with pytest.raises(ConfigError) as err:
        parse_app_config(_config(ep))
    assert err.value.field.startswith(field), err.value


def test_worker_resources_follow_the_rank_count():
    two = ExpertParallelConfig(size=2)
    assert worker_actor_options(two, EngineConfig(device="cpu")) == {
        "ray_actor_options": {"num_cpus": 2}
    }
    assert worker_actor_options(two, EngineConfig(device="cuda")) == {
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 2}
    }
    # Left to the code, the app's worker deployments ask for them.
    config = parse_app_config(_config({"prefill": {"size": 2}, "decode": {"size": 3}}))
    decode = build_application(config)._bound_deployment.init_args[1]._bound_deployment
    prefill = decode.init_args[1]._bound_deployment
    assert (prefill.name, prefill.ray_actor_options["num_cpus"]) == ("PrefillServer", 2)
    assert (decode.name, decode.ray_actor_options["num_cpus"]) == ("DecodeServer", 3)


@pytest.mark.parametrize(
    ("device", "actor", "message"),
    [
        ("cpu", {"num_cpus": 1}, "deployments[2].ray_actor_options.num_cpus: must be at least 2"),
        (
            "cuda",
            {"num_cpus": 2, "num_gpus": 1},
            "deployments[2].ray_actor_options.num_gpus: must be 2",
        ),
        ("cuda", {"num_cpus": 2}, "deployments[2].ray_actor_options.num_gpus: must be 2"),
        (
            "cpu",
            {"num_cpus": 2, "num_gpus": 3},
            "deployments[2].ray_actor_options.num_gpus: must be 2",
        ),
    ],
)
def test_resources_the_file_names_must_fit_the_ranks(device, actor, message):
    raw = _config({"decode": {"size": 2}}, device, {"DecodeServer": actor})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_app_config(copy.deepcopy(raw))
    # One rank: whatever the file says stands.
    parse_app_config(_config(None, device, {"DecodeServer": actor}))


def test_resources_that_fit_are_accepted():
    actors = {
        "PrefillServer": {"num_cpus": 2, "num_gpus": 2},
        "DecodeServer": {"num_cpus": 4, "num_gpus": 2},
    }
    ep = {"prefill": {"size": 2}, "decode": {"size": 2}}
    config = parse_app_config(_config(ep, "cuda", actors))
    assert config.settings.decode_ep.size == 2
