"""The Serve config file: the shipped default loads, flags override it, and every bad
value is refused with an error naming its field by its path in the file."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tandem.cluster.api.refusals import RefusalBudgetConfig
from tandem.cluster.autoscaling import PoolAutoscaler
from tandem.cluster.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ConfigOverrides,
    TandemSettings,
    load_app_config,
    parse_app_config,
)
from tandem.workers.disagg.roles import DisaggConfig
from tandem.workers.engine.llm_engine import EngineConfig


@pytest.fixture(scope="module")
def shipped() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def test_shipped_default_loads(tmp_path):
    config = load_app_config()
    s = config.settings
    assert config.app_name == "tandem"
    assert config.serve.proxy_location.value == "Disabled"
    assert s.model_dir is None and s.redis_url is None and s.cluster_name == "default"
    assert s.disagg == DisaggConfig(local_prefill_threshold=32, transfer_deadline_s=10.0)
    assert s.prefill_engine == EngineConfig(
        device="cpu",
        dtype="float32",
        block_size=16,
        kv_cache_tokens=32768,
        max_num_seqs=64,
        max_num_batched_tokens=1024,
    )
    assert s.decode_engine == s.prefill_engine
    assert (s.placement.prefill, s.placement.decode) == ("prefix_aware", "prefix_aware")
    assert (s.grpc.host, s.grpc.port) == ("127.0.0.1", 50051)
    assert s.api_key_env == "TANDEM_API_KEY"
    assert (s.max_start_delay_s, s.admission_initial_limit_tokens) == (2.0, 4096)
    assert s.refusal_budget() == RefusalBudgetConfig(burst=32, per_s=4.0)
    assert s.control_plane.heartbeat_interval_s < s.control_plane.heartbeat_ttl_s
    assert config.deployments["Ingress"].num_replicas == 1
    for name in ("Ingress", "PrefillServer", "DecodeServer"):
        assert config.deployments[name].options()["ray_actor_options"]["num_cpus"] == 1
    # The worker pools scale on their own signals, 1 to 2 replicas each.
    for name, metric in (("PrefillServer", "queued_prompt_tokens"), ("DecodeServer", "kv_usage")):
        scaling = config.deployments[name].options()["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 2)
        policy = scaling["policy"]
        assert policy["policy_function"] == "tandem.cluster.autoscaling:PoolAutoscaler"
        assert metric in PoolAutoscaler(**policy["policy_kwargs"]).targets
    # Explicit path, same answer.
    assert load_app_config(DEFAULT_CONFIG_PATH).settings == s


def test_args_round_trip_through_json():
    """What the deployments receive (args_json) rebuilds exactly the same settings."""
    config = load_app_config()
    assert TandemSettings.from_json(config.args_json) == config.settings


def test_overrides_apply_on_top_of_the_file(shipped):
    raw = copy.deepcopy(shipped)
    raw["applications"][0]["deployments"][2] = {
        "name": "DecodeServer",
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
    }
    config = parse_app_config(
        raw,
        overrides=ConfigOverrides(
            prefill_replicas=2,
            decode_replicas=3,
            model="/models/gpt-oss-20b",
            redis_url="redis://10.0.0.1:6379/0",
            grpc_host="0.0.0.0",
            grpc_port=6000,
            api_key_env="MY_KEY",
            device="cuda",
        ),
    )
    s = config.settings
    assert config.deployments["PrefillServer"].num_replicas == 2
    decode = config.deployments["DecodeServer"].options()
    assert decode["num_replicas"] == 3 and "autoscaling_config" not in decode
    assert s.model_dir == Path("/models/gpt-oss-20b")
    assert s.resolve_redis_url() == "redis://10.0.0.1:6379/0"
    assert (s.grpc.host, s.grpc.port, s.api_key_env) == ("0.0.0.0", 6000, "MY_KEY")
    assert s.prefill_engine.device == s.decode_engine.device == "cuda"
    # The file itself is left alone.
    assert "num_replicas" not in raw["applications"][0]["deployments"][2]


def test_missing_sections_take_defaults():
    config = parse_app_config(
        {"applications": [{"name": "t", "import_path": "tandem.cluster.app:build_app"}]}
    )
    assert config.settings.prefill_engine == EngineConfig()
    assert config.settings.disagg == DisaggConfig()
    assert all(d.options() == {} for d in config.deployments.values())
    # A replica count given only on the command line creates the deployment's entry.
    config = parse_app_config(
        {"applications": [{"name": "t", "import_path": "tandem.cluster.app:build_app"}]},
        overrides=ConfigOverrides(prefill_replicas=4),
    )
    assert config.deployments["PrefillServer"].options() == {"num_replicas": 4}


def test_redis_url_from_environment(monkeypatch):
    settings = load_app_config().settings
    monkeypatch.delenv("TANDEM_REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match="args.redis_url") as err:
        settings.resolve_redis_url()
    assert "TANDEM_REDIS_URL" in str(err.value)
    monkeypatch.setenv("TANDEM_REDIS_URL", "redis://:pw@h:1/0")
    assert settings.resolve_redis_url() == "redis://:pw@h:1/0"
    assert "pw" not in repr(settings)


def _set(raw: dict, path: str, value) -> dict:
    """A copy of `raw` with the dotted `path` (list indices as numbers) set to `value`."""
    out = copy.deepcopy(raw)
    node = out
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return out


ARGS = "applications.0.args"


def test_refusal_budget_off_with_a_zero_burst(shipped):
    off = parse_app_config(_set(shipped, f"{ARGS}.ingress.refusal_burst", 0)).settings
    assert off.refusal_budget() is None
    tight = _set(shipped, f"{ARGS}.ingress.refusal_burst", 2)
    tight = _set(tight, f"{ARGS}.ingress.refusal_per_s", 0.5)
    assert parse_app_config(tight).settings.refusal_budget() == RefusalBudgetConfig(2, 0.5)


def test_gpu_memory_utilization_sizes_the_kv_cache_on_cuda_only(shipped):
    shipped_decode = shipped["applications"][0]["args"]["engine"]["decode"]
    base = {k: v for k, v in shipped_decode.items() if k != "kv_cache_tokens"}
    engine = {**base, "device": "cuda", "gpu_memory_utilization": 0.8}
    s = parse_app_config(_set(shipped, f"{ARGS}.engine.decode", engine)).settings
    assert s.decode_engine.kv_cache_tokens is None  # sized from the GPU at start
    assert s.decode_engine.gpu_memory_utilization == 0.8
    explicit = {**engine, "kv_cache_tokens": 4096}
    s = parse_app_config(_set(shipped, f"{ARGS}.engine.decode", explicit)).settings
    assert s.decode_engine.kv_cache_tokens == 4096
    on_cpu = {**base, "device": "cpu", "gpu_memory_utilization": 0.8}
    s = parse_app_config(_set(shipped, f"{ARGS}.engine.decode", on_cpu)).settings
    assert s.decode_engine.kv_cache_tokens == EngineConfig().kv_cache_tokens


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (
            f"{ARGS}.disagg.transfer_deadline_s",
            0,
            "applications[0].args.disagg.transfer_deadline_s",
        ),
        (
            f"{ARGS}.disagg.local_prefill_threshold",
            -1,
            "applications[0].args.disagg.local_prefill_threshold",
        ),
        (f"{ARGS}.grpc.port", 70000, "applications[0].args.grpc.port"),
        (f"{ARGS}.grpc.port", "50051", "applications[0].args.grpc.port"),
        (f"{ARGS}.placement.decode", "random", "applications[0].args.placement.decode"),
        (f"{ARGS}.cluster_name", "no spaces", "applications[0].args.cluster_name"),
        (f"{ARGS}.engine.prefill.dtype", "int8", "applications[0].args.engine.prefill.dtype"),
        (
            f"{ARGS}.engine.decode.max_num_seqs",
            0,
            "applications[0].args.engine.decode.max_num_seqs",
        ),
        (f"{ARGS}.engine.decode.blocksize", 8, "applications[0].args.engine.decode.blocksize"),
        (
            f"{ARGS}.engine.decode.gpu_memory_utilization",
            1.5,
            "applications[0].args.engine.decode.gpu_memory_utilization",
        ),
        (f"{ARGS}.transfer_deadline", 1.0, "applications[0].args.transfer_deadline"),
        (
            f"{ARGS}.control_plane.heartbeat_ttl_s",
            0.01,
            "applications[0].args.control_plane.heartbeat_ttl_s",
        ),
        (
            f"{ARGS}.ingress.max_waiting_requests",
            0,
            "applications[0].args.ingress.max_waiting_requests",
        ),
        (
            f"{ARGS}.ingress.admission_initial_limit_tokens",
            0,
            "applications[0].args.ingress.admission_initial_limit_tokens",
        ),
        (
            f"{ARGS}.ingress.refusal_per_s",
            0,
            "applications[0].args.ingress.refusal_per_s",
        ),
        (
            "applications.0.deployments.0.num_replicas",
            0,
            "applications[0].deployments[0].num_replicas",
        ),
        (
            "applications.0.deployments.2.max_ongoing_requests",
            0,
            "applications[0].deployments[2].max_ongoing_requests",
        ),
        ("applications.0.deployments.0.name", "Router", "applications[0].deployments[0].name"),
        ("applications.0.import_path", "my.app:build", "applications[0].import_path"),
    ],
)
def test_bad_values_name_their_field(shipped, path, value, field):
    with pytest.raises(ConfigError) as err:
        parse_app_config(_set(shipped, path, value))
    assert err.value.field == field, str(err.value)
    assert str(err.value).startswith(field)


def test_errors_from_cross_field_rules(shipped):
    cases = [
        # KV blocks move between the pools unchanged.
        (f"{ARGS}.engine.decode.block_size", 8, "applications[0].args.engine.decode.block_size"),
        (f"{ARGS}.engine.decode.dtype", "bfloat16", "applications[0].args.engine.decode.dtype"),
        # EngineConfig's own rule: the cache must hold one block.
        (f"{ARGS}.engine.prefill.kv_cache_tokens", 4, "applications[0].args.engine.prefill"),
        (
            f"{ARGS}.control_plane.heartbeat_interval_s",
            20.0,
            "applications[0].args.control_plane.heartbeat_interval_s",
        ),
        (f"{ARGS}.grpc.tls_cert_file", "/etc/cert.pem", "applications[0].args.grpc.tls_cert_file"),
    ]
    for path, value, field in cases:
        with pytest.raises(ConfigError) as err:
            parse_app_config(_set(shipped, path, value))
        assert err.value.field == field, (path, str(err.value))


def test_structural_errors(shipped, tmp_path):
    two = copy.deepcopy(shipped)
    second = copy.deepcopy(two["applications"][0])
    second["name"] = "other"
    second["route_prefix"] = "/other"
    two["applications"].append(second)
    with pytest.raises(ConfigError, match="exactly one application") as err:
        parse_app_config(two)
    assert err.value.field == "applications"

    dup = copy.deepcopy(shipped)
    dup["applications"][0]["deployments"].append({"name": "Ingress", "num_replicas": 2})
    with pytest.raises(ConfigError, match="listed twice") as err:
        parse_app_config(dup)
    assert err.value.field == "applications[0].deployments[3].name"

    router = _set(
        shipped,
        "applications.0.deployments.1.request_router_config",
        {"request_router_class": "ray.serve.request_router:RequestRouter"},
    )
    with pytest.raises(ConfigError) as err:
        parse_app_config(router)
    assert err.value.field == "applications[0].deployments[1].request_router_config"

    both = _set(shipped, "applications.0.deployments.1.num_replicas", 3)
    with pytest.raises(ConfigError, match="autoscaling_config") as err:
        parse_app_config(both)
    assert err.value.field.startswith("applications[0].deployments[1]")

    with pytest.raises(ConfigError, match="applications"):
        parse_app_config({"proxy_location": "Disabled"})
    with pytest.raises(ConfigError, match="mapping"):
        parse_app_config(["not", "a", "mapping"])

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("applications: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_app_config(bad_yaml)
    with pytest.raises(ConfigError, match="cannot read"):
        load_app_config(tmp_path / "missing.yaml")


def test_build_app_accepts_args_and_refuses_bad_ones():
    """The import path Serve configs name builds from `args` alone, validating them."""
    from ray.serve import Application

    from tandem.cluster.app import build_app, build_application

    assert isinstance(build_app({}), Application)
    assert isinstance(build_application(load_app_config()), Application)
    with pytest.raises(ConfigError) as err:
        build_app({"disagg": {"transfer_deadline_s": -1}})
    assert err.value.field == "args.disagg.transfer_deadline_s"
