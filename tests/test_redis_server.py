"""LocalRedis against the real redis-server: lifecycle, password, restart, no leaks."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import tandem.cluster.redis_server as redis_server_module
from tandem.cluster.redis_server import LocalRedis

PASSWORD = 'pa ss"wo\\rd-é'


def _client(**kwargs) -> redis.Redis:
    # No retries: an authentication failure should fail at once, not after backoff.
    return redis.Redis(retry=Retry(NoBackoff(), 0), **kwargs)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_start_ping_and_stop_leaves_nothing_behind():
    with LocalRedis() as server:
        pid, port, directory = server.pid, server.port, server._dir
        assert server.running and pid is not None
        assert server.url == f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.ping() is True
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        client.close()
        assert directory is not None and directory.is_dir()
    assert not server.running and server.pid is None
    assert _process_gone(pid)
    assert _port_closed(port)
    assert not directory.exists()


def test_password_is_required_and_never_shown(caplog):
    caplog.set_level(logging.DEBUG)
    with LocalRedis(password=PASSWORD) as server:
        with pytest.raises(redis.AuthenticationError):
            _client(host=server.host, port=server.port).ping()
        with pytest.raises(redis.AuthenticationError):
            _client(host=server.host, port=server.port, password="wrong").ping()
        assert _client(host=server.host, port=server.port, password=PASSWORD).ping()
        assert redis.Redis.from_url(server.url).ping()

        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert PASSWORD.encode() not in cmdline
        assert b"requirepass" not in cmdline
        assert not (server._dir / "redis.conf").exists()
        assert PASSWORD not in repr(server)
        assert server.redacted_url == f"redis://:***@127.0.0.1:{server.port}/0"
    assert caplog.records, "expected start-up log lines"
    assert all(PASSWORD not in record.getMessage() for record in caplog.records)


def test_restart_keeps_the_port_and_loses_the_data():
    with LocalRedis(password="s3cret") as server:
        port, first_pid = server.port, server.pid
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        server.restart()
        assert server.port == port
        assert server.pid != first_pid and _process_gone(first_pid)
        # The same client object reconnects to the new process.
        assert client.get("k") is None
        client.close()


def test_stop_then_start_reuses_the_port():
    with LocalRedis() as server:
        port = server.port
        server.stop()
        assert not server.running and _port_closed(port)
        server.start()
        assert server.port == port and redis.Redis.from_url(server.url).ping()


def test_missing_binary_names_the_package():
    with pytest.raises(FileNotFoundError, match="install Debian's redis-server"):
        LocalRedis(binary="/nonexistent/redis-server")


def test_failed_start_reports_the_servers_output(tmp_path):
    # Injected fault: a "redis-server" that complains and exits.
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: injected start-up failure' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = LocalRedis(binary=str(fake))
    with pytest.raises(RuntimeError, match="status 3") as info:
        server.start()
    assert "FATAL: injected start-up failure" in str(info.value)
    assert not server.running
    server.close()


def test_port_taken_before_bind_is_retried(monkeypatch):
    # Injected fault: the first "free" port is already bound by someone else.
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real_free_port = redis_server_module._free_port
    ports = iter([taken])
    monkeypatch.setattr(
        redis_server_module, "_free_port", lambda host: next(ports, None) or real_free_port(host)
    )
    try:
        with LocalRedis() as server:
            assert server.port != taken
            assert redis.Redis.from_url(server.url).ping()
    finally:
        squatter.close()


def test_interpreter_exit_stops_the_server():
    # A child interpreter starts a server and exits without closing it: atexit must.
    code = textwrap.dedent(
        """
        import sys
        from tandem.cluster.redis_server import LocalRedis
        server = LocalRedis().start()
        print(server.pid, server.port, flush=True)
        sys.exit(0)
        """
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    pid, port = map(int, result.stdout.split())
    assert _process_gone(pid)
    assert _port_closed(port)
