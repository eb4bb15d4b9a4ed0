"""`tandem serve`: the whole cluster on this machine, from one Serve config file.

    tandem serve [--model DIR] [--config FILE] [--prefill N] [--decode M]
                 [--host H] [--grpc-port P] [--tls-cert PEM --tls-key PEM]
                 [--http-port P] [--redis-url URL] [--api-key-env VAR] [--device D]

    1. load and validate the config (deploy/serve-config.yaml unless --config), flags on
       top; refuse at once (one line, non-zero exit) when the gRPC port is taken
    2. a private redis-server (LocalRedis) unless a Redis URL is given
    3. a local Ray with enough logical CPUs for every replica's request
    4. the application through serve.run; Serve's HTTP proxy only with --http-port (or a
       config with a proxy and a route prefix): the OpenAI-compatible API
    5. print the gRPC target; on Ctrl-C or SIGTERM shut Serve, Ray and Redis down in turn
"""

from __future__ import annotations

import argparse
import math
import os
import signal
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from tandem.cluster.config import (
    INGRESS,
    AppConfig,
    ConfigError,
    ConfigOverrides,
    load_app_config,
)


def overrides_from_args(args: argparse.Namespace) -> ConfigOverrides:
    return ConfigOverrides(
        prefill_replicas=args.prefill,
        decode_replicas=args.decode,
        model=args.model,
        redis_url=args.redis_url,
        grpc_host=args.host,
        grpc_port=args.grpc_port,
        grpc_tls_cert_file=_pem_path(args, "tls_cert"),
        grpc_tls_key_file=_pem_path(args, "tls_key"),
        api_key_env=args.api_key_env,
        device=args.device,
        http_port=getattr(args, "http_port", None),
    )


def _pem_path(args: argparse.Namespace, name: str) -> str | None:
    """An absolute path (replicas may run elsewhere in the tree), checked readable here so
    a typo fails now rather than in an Ingress replica."""
    value = getattr(args, name, None)
    if value is None:
        return None
    path = Path(value).resolve()
    if not path.is_file():
        raise SystemExit(f"tandem serve: --{name.replace('_', '-')}: no such file {value}")
    return str(path)


def logical_cpus(config: AppConfig) -> int:
    """CPUs to give the local Ray: every replica's num_cpus, autoscaled deployments at
    their maximum (a local Ray has no autoscaler to add nodes), and at least the
    machine's core count."""
    total = 0.0
    for d in config.deployments.values():
        options = d.options()
        count = options.get("num_replicas")
        if not isinstance(count, int):
            scaling = options.get("autoscaling_config") or {}
            count = scaling.get("max_replicas") or scaling.get("min_replicas") or 1
        cpus = (options.get("ray_actor_options") or {}).get("num_cpus", 1)
        total += count * cpus
    return max(math.ceil(total), os.cpu_count() or 1)


def check_one_ingress(config: AppConfig) -> None:
    """This machine is one Ray node, and an Ingress replica binds the gRPC port
    exclusively: a second replica here could never bind it (in a cluster, each node's
    pod holds one). Raises ConfigError."""
    ingress = config.deployments.get(INGRESS)
    if ingress is None:
        return
    options = ingress.options()
    count = options.get("num_replicas")
    if not isinstance(count, int):
        count = (options.get("autoscaling_config") or {}).get("max_replicas") or 1
    if count > 1 and not config.settings.grpc.shared_port:
        raise ConfigError(
            f"deployments.{INGRESS}",
            f"{count} Ingress replicas on one machine: each binds the gRPC port exclusively, "
            "so `tandem serve` runs one (or set args.grpc.shared_port for a test cluster)",
        )


def _grpc_target(config: AppConfig) -> str:
    grpc = config.settings.grpc
    host = "127.0.0.1" if grpc.host in ("0.0.0.0", "::", "[::]") else grpc.host
    return f"{host}:{grpc.port}"


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived: unwind, shutting down what was started so far."""


def _on_stop_signals(handler) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def _stop(signum: int, frame: object) -> None:
    # A second signal cuts the current shutdown step short (KeyboardInterrupt); the steps
    # after it still run, and atexit still stops the private redis-server.
    _on_stop_signals(signal.default_int_handler)
    raise _Stopped


def run_serve(args: argparse.Namespace) -> int:
    """The `tandem serve` command; returns the exit status."""
    overrides = overrides_from_args(args)
    try:
        config = load_app_config(args.config, overrides)
    except ConfigError as err:
        raise SystemExit(f"tandem serve: {err}") from None
    settings = config.settings
    # Our listeners bind exclusively: a second `tandem serve` on a taken port must not
    # start a cluster whose Ingress can never bind (nor share the port, as SO_REUSEPORT
    # would let it).
    from tandem.cluster.api.server import PortInUse, check_port_free

    try:
        check_one_ingress(config)
        check_port_free(settings.grpc.host, settings.grpc.port)
        if config.http_enabled:
            # Serve's proxy would retry a taken port forever behind a server that looks up.
            http = config.serve.http_options
            try:
                check_port_free(http.host, http.port)
            except PortInUse:
                raise PortInUse(f"HTTP port {http.port} on {http.host} is already in use") from None
    except (ConfigError, PortInUse) as err:
        raise SystemExit(f"tandem serve: {err}") from None

    # Imported here: the other commands must not pay for Ray's import.
    import ray
    from ray import serve

    from tandem.cluster.app import build_application
    from tandem.cluster.redis_server import LocalRedis

    _on_stop_signals(_stop)
    try:
        with ExitStack() as cleanup:
            # The embedded model is made once here rather than raced by every replica; a
            # given directory is checked before any replica tries to load it.
            try:
                overrides = replace(overrides, model=str(settings.resolve_model_dir()))
            except FileNotFoundError as err:
                raise SystemExit(f"tandem serve: {err}") from None
            if settings.redis_url is None and not os.environ.get(settings.redis_url_env):
                redis = cleanup.enter_context(LocalRedis())
                overrides = replace(overrides, redis_url=redis.url)
                print(f"tandem: private redis-server on {redis.redacted_url}", flush=True)
            config = load_app_config(args.config, overrides)
            # The replicas inherit this process's environment: the API key and Redis URL
            # variables reach them without passing through the config.
            ray.init(num_cpus=logical_cpus(config), include_dashboard=False)
            cleanup.callback(ray.shutdown)
            # ray.init installs a SIGTERM handler of its own (sys.exit); ours unwinds.
            _on_stop_signals(_stop)
            serve.start(
                proxy_location=config.serve.proxy_location,
                # Serve takes a dict (or its own HTTPOptions), not the schema it validated.
                http_options=config.serve.http_options.model_dump(exclude_unset=True),
                logging_config=config.serve.logging_config,
            )
            cleanup.callback(serve.shutdown)
            cleanup.callback(print, "tandem: shutting down", flush=True)
            serve.run(
                build_application(config), name=config.app_name, route_prefix=config.route_prefix
            )
            target = _grpc_target(config)
            pools = ", ".join(
                f"{n} x{d.num_replicas or 'auto'}" for n, d in config.deployments.items()
            )
            print(f"tandem: serving {config.settings.model_dir} with {pools}", flush=True)
            if config.http_enabled:
                # Printed before the gRPC line, which tells scripts the server is ready.
                print(f"tandem: HTTP (OpenAI API) on {config.http_url}", flush=True)
            print(f"tandem: gRPC on {target}", flush=True)
            print(f"tandem: try `tandem client --target {target} --prompt hello`", flush=True)
            while True:
                signal.pause()
    except _Stopped:
        pass
    return 0
