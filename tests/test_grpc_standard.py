"""The gRPC server as standard tools see it, over loopback: grpc.health.v1 through
grpcio-health-checking's own client stub, server reflection through grpcio-reflection's
client, an exclusive listening port, and TLS with a throwaway CA made here with the
`cryptography` package.

Every server runs the tiny model on a real engine (tests/support/api_server.py); a stuck
engine is a real engine thread blocked by its fault hook.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tandem.cluster import client_cli
from tandem.cluster.api.gen import tandem_pb2 as pb
from tandem.cluster.api.health import ServerHealth
from tandem.cluster.api.server import PortInUse, ServerConfig, TandemServer
from tandem.cluster.client import TandemClient
from tandem.cluster.config import ConfigOverrides, load_app_config
from tandem.cluster.serve_cmd import check_one_ingress, overrides_from_args
from tandem.workers.synthetic.tiny_model import default_model_dir
from tests.support.api_server import EventLoopThread, new_backend

SERVICE = "tandem.v1.Tandem"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
API_KEY = "standard-key-0123456789"


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[EventLoopThread]:
    lt = EventLoopThread()
    yield lt
    lt.close()


@pytest.fixture()
def engine(loop_thread):
    """A fresh engine with fault hooks (its health check gives up after 0.5 s)."""
    backend, llm, hooks = new_backend(default_model_dir(), health_timeout_s=0.5)
    yield backend, hooks
    hooks.paused.clear()
    hooks.unstick.set()
    hooks.step_delay_s = 0.0
    loop_thread.run(backend.close())


@pytest.fixture()
def server(engine, loop_thread) -> Iterator[TandemServer]:
    srv = loop_thread.start_server(engine[0], health_timeout_s=2.0)
    yield srv
    loop_thread.run(srv.stop(0))


def check(target: str, service: str, **kwargs) -> health_pb2.HealthCheckResponse:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10, **kwargs)


# --------------------------------------------------------------------------- health


def test_standard_health_per_service_and_overall_follows_the_engine(engine, server):
    _, hooks = engine
    for service in ("", SERVICE, HEALTH, REFLECTION):
        assert check(server.target, service).status == SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        check(server.target, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    hooks.stuck.set()  # the engine thread blocks inside its loop
    try:
        assert check(server.target, "").status == NOT_SERVING
        assert check(server.target, SERVICE).status == NOT_SERVING
        # Our own Health says the same, with the reason.
        with TandemClient(server.target) as c:
            ours = c.health()
        assert ours.status == pb.HealthResponse.NOT_SERVING and "engine" in ours.detail
    finally:
        hooks.unstick.set()
        hooks.stuck.clear()
    assert check(server.target, "").status == SERVING
    assert check(server.target, SERVICE).status == SERVING


def test_standard_health_needs_no_api_key_but_everything_else_does(engine, loop_thread):
    srv = loop_thread.start_server(engine[0], api_key=API_KEY)
    try:
        assert check(srv.target, "").status == SERVING
        with pytest.raises(grpc.RpcError) as info:
            ProtoReflectionDescriptorDatabase(grpc.insecure_channel(srv.target)).get_services()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        loop_thread.run(srv.stop(0))


def test_drain_turns_every_service_not_serving_and_admitted_streams_finish(
    engine, server, loop_thread
):
    _, hooks = engine
    hooks.step_delay_s = 0.05  # keep a stream in flight across the drain
    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=60
        )
        assert next(watch).status == SERVING
        with TandemClient(server.target) as c:
            stream = c.generate("keep going", max_tokens=12, temperature=0.0)
            first = next(stream)  # admitted: it has its first token
            loop_thread.run(server.drain())
            assert next(watch).status == NOT_SERVING
            for service in ("", SERVICE, HEALTH, REFLECTION):
                assert check(server.target, service).status == NOT_SERVING, service
            assert c.health().status == pb.HealthResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                list(c.generate("new work", max_tokens=2))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in info.value.details()
            rest = list(stream)
        watch.cancel()
    chunks = [first, *rest]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 12


# ----------------------------------------------------------------------- reflection


def test_reflection_lists_the_services_and_describes_ours(server):
    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert set(db.get_services()) == {SERVICE, HEALTH, REFLECTION}
        service = DescriptorPool(db).FindServiceByName(SERVICE)
        assert [m.name for m in service.methods] == ["Generate", "Chat", "Health", "ListModels"]
        chat = service.methods_by_name["Chat"]
        assert chat.input_type.full_name == "tandem.v1.ChatRequest" and chat.server_streaming


# ---------------------------------------------------------------- exclusive port


def test_second_server_on_a_taken_port_is_refused(engine, server, loop_thread):
    assert_no_port_sharing(server.port)
    with pytest.raises(PortInUse, match=f"port {server.port} "):
        loop_thread.run(
            TandemServer.start(engine[0], ServerConfig(host="127.0.0.1", port=server.port))
        )
    # Nor may a wildcard bind take it over.
    with pytest.raises(PortInUse, match=f"port {server.port} "):
        loop_thread.run(
            TandemServer.start(engine[0], ServerConfig(host="0.0.0.0", port=server.port))
        )
    # `tandem serve` refuses before starting Ray or Redis: one line, non-zero exit.
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_REDIS_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cluster.cli", "serve", "--grpc-port", str(server.port)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode != 0
    # One line of ours (libraries may warn on import); no traceback.
    ours = [line for line in done.stderr.splitlines() if line.startswith("tandem serve:")]
    assert len(ours) == 1 and f"port {server.port} " in ours[0], done.stderr
    assert "Traceback" not in done.stderr
    assert "private redis-server" not in done.stdout
    # The first server never noticed.
    assert check(server.target, "").status == SERVING


# ----------------------------------------------------------------------------- TLS


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_server_cert(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> tuple[bytes, bytes]:
    """A leaf certificate for 127.0.0.1 and localhost signed by `ca`: (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("tandem-test-server"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate it signed, and an unrelated second CA, as PEM files."""
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = make_ca("tandem test CA")
    other, _ = make_ca("some other CA")
    cert, key = make_server_cert(ca, ca_key)
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "other_ca": other.public_bytes(serialization.Encoding.PEM),
        "cert": cert,
        "key": key,
    }
    paths = {}
    for name, data in files.items():
        paths[name] = d / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def _client_args(target: str, **extra) -> argparse.Namespace:
    base = dict(
        target=target,
        api_key_env=None,
        prompt=None,
        chat=None,
        health=True,
        max_tokens=None,
        temperature=None,
        timeout=10.0,
        json=False,
        tls=False,
        tls_ca=None,
    )
    return argparse.Namespace(**(base | extra))


def test_tls_refuses_plaintext_and_wrong_ca_clients(engine, loop_thread, pki):
    srv = loop_thread.start_server(engine[0], tls_cert_file=pki["cert"], tls_key_file=pki["key"])
    try:
        with TandemClient(srv.target, root_certificates=pki["ca"].read_bytes()) as c:
            assert c.health(timeout=10).status == pb.HealthResponse.SERVING
            chunks = list(c.generate("over TLS", max_tokens=2))
            assert chunks[-1].usage.completion_tokens == 2
        for kwargs in ({}, {"root_certificates": pki["other_ca"].read_bytes()}):
            with TandemClient(srv.target, **kwargs) as c:
                with pytest.raises(grpc.RpcError) as info:
                    c.health(timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, kwargs
        # The same through `tandem client`: --tls-ca with the right CA, then the wrong one.
        out = io.StringIO()
        assert client_cli.run(_client_args(srv.target, tls_ca=str(pki["ca"])), out) == 0
        assert out.getvalue().strip() == "SERVING"
        assert client_cli.run(_client_args(srv.target, tls_ca=str(pki["other_ca"])), out) == 1
        assert client_cli.run(_client_args(srv.target), out) == 1  # plaintext
    finally:
        loop_thread.run(srv.stop(0))


def test_plaintext_health_port_beside_a_tls_server_serves_health_only(engine, loop_thread, pki):
    """kubelet's grpc probes speak no TLS: the probe port answers grpc.health.v1 in
    plaintext and nothing else; the API itself stays TLS-only."""
    _, hooks = engine
    srv = loop_thread.start_server(
        engine[0], tls_cert_file=pki["cert"], tls_key_file=pki["key"], health_port=0
    )
    probe = f"127.0.0.1:{srv.health_port}"
    try:
        assert srv.health_port not in (None, srv.port)
        assert check(probe, "").status == SERVING
        assert check(probe, SERVICE).status == SERVING
        hooks.stuck.set()
        try:
            assert check(probe, SERVICE).status == NOT_SERVING
        finally:
            hooks.unstick.set()
            hooks.stuck.clear()
        with grpc.insecure_channel(probe) as channel:
            with pytest.raises(grpc.RpcError) as info:
                ProtoReflectionDescriptorDatabase(channel).get_services()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            generate = channel.unary_stream(
                f"/{SERVICE}/Generate",
                request_serializer=pb.GenerateRequest.SerializeToString,
                response_deserializer=pb.GenerateChunk.FromString,
            )
            with pytest.raises(grpc.RpcError) as info:
                list(generate(pb.GenerateRequest(text="hi"), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        loop_thread.run(srv.drain())
        assert check(probe, SERVICE).status == NOT_SERVING
    finally:
        loop_thread.run(srv.stop(0))


def test_serve_tls_flags_reach_the_config(pki, tmp_path):
    args = argparse.Namespace(
        prefill=None,
        decode=None,
        model=None,
        redis_url=None,
        host=None,
        grpc_port=None,
        api_key_env=None,
        device=None,
        tls_cert=str(pki["cert"]),
        tls_key=str(pki["key"]),
    )
    grpc_settings = load_app_config(None, overrides_from_args(args)).settings.grpc
    assert (grpc_settings.tls_cert_file, grpc_settings.tls_key_file) == (pki["cert"], pki["key"])
    args.tls_key = str(tmp_path / "missing.pem")
    with pytest.raises(SystemExit, match="--tls-key: no such file"):
        overrides_from_args(args)


def test_serve_runs_one_ingress_replica_on_a_machine(tmp_path):
    check_one_ingress(load_app_config(None, ConfigOverrides()))
    raw = yaml.safe_load(Path("deploy/serve-config.yaml").read_text())
    app = raw["applications"][0]
    app["deployments"] = [d for d in app.get("deployments", []) if d["name"] != "Ingress"]
    app["deployments"].append({"name": "Ingress", "num_replicas": 2})
    path = tmp_path / "two-ingresses.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="2 Ingress replicas on one machine"):
        check_one_ingress(load_app_config(str(path), ConfigOverrides()))


class CountingHealthBackend:
    """Wraps a real backend's check: counts the calls, and holds each one (`entered` set)
    until `release` is set."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.calls = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def check_health(self):
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        return await self.backend.check_health()


def test_concurrent_health_checks_share_one_engine_check(engine, loop_thread):
    """Health is unauthenticated: a flood of probes must cost one engine check at a time."""

    async def flood(counting: CountingHealthBackend) -> list:
        health = ServerHealth(counting, timeout_s=10.0, engine_services=(SERVICE,))
        tasks = [asyncio.ensure_future(health.check()) for _ in range(20)]
        await counting.entered.wait()
        for _ in range(3):  # let every task reach the shared check before releasing it
            await asyncio.sleep(0)
        counting.release.set()
        first = await asyncio.gather(*tasks)
        counting.release.clear()
        counting.entered.clear()
        later = asyncio.ensure_future(health.check())
        await counting.entered.wait()
        counting.release.set()
        return [*first, await later]

    async def run() -> tuple[list, int]:
        counting = CountingHealthBackend(engine[0])
        statuses = await flood(counting)
        return statuses, counting.calls

    statuses, calls = loop_thread.run(run())
    assert len(statuses) == 21 and all(s.serving for s in statuses)
    assert calls == 2  # one for the 20 concurrent checks, one for the later check


# ------------------------------------------------------- the real `tandem serve`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_no_port_sharing(port: int) -> None:
    """A socket asking to share the port (SO_REUSEPORT, as grpc's default does) cannot
    bind it: the listener holding it did not opt in to sharing."""
    with socket.socket() as intruder:
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError):
            intruder.bind(("127.0.0.1", port))


def test_tandem_serve_with_tls_owns_its_port(pki):
    """The cluster as users start it: Ray Serve's Ingress replica binds the port with TLS,
    exclusively; a second `tandem serve` on it is refused in one line; plaintext and
    wrong-CA clients are refused; the standard health service answers over TLS."""
    from tests.support.serve_process import serve_process

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("TANDEM_REDIS_URL", "TANDEM_API_KEY")}
    tandem = [sys.executable, "-m", "tandem.cluster.cli"]
    tls = ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])]
    with serve_process([*tandem, "serve", "--grpc-port", str(port), *tls], env) as server:
        server.wait_ready(300)
        target = f"127.0.0.1:{port}"
        ca = pki["ca"].read_bytes()
        with TandemClient(target, root_certificates=ca) as c:
            assert c.health(timeout=30).status == pb.HealthResponse.SERVING
            assert list(c.generate("hi", max_tokens=2, timeout=60))[-1].usage.completion_tokens == 2
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        with grpc.secure_channel(target, credentials) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE):
                request = health_pb2.HealthCheckRequest(service=service)
                assert stub.Check(request, timeout=30).status == SERVING
        for kwargs in ({}, {"root_certificates": pki["other_ca"].read_bytes()}):
            with TandemClient(target, **kwargs) as c:
                with pytest.raises(grpc.RpcError) as info:
                    c.health(timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert_no_port_sharing(port)
        second = subprocess.run(
            [*tandem, "serve", "--grpc-port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert second.returncode != 0
        assert any(
            line.startswith("tandem serve:") and f"port {port} " in line
            for line in second.stderr.splitlines()
        ), second.stderr
        assert server.stop() == 0, server.tail()
