"""A private redis-server for `tandem serve` (when no --redis-url is given) and for tests.

    with LocalRedis(password="s3cret") as server:
        client = redis.Redis.from_url(server.url)

The server binds 127.0.0.1 on a free port, keeps nothing on disk (no RDB snapshots, no
AOF; the control plane rebuilds its state after a restart, see workers/control_plane),
and lives in a private temporary directory that is removed on exit.

The password never appears where other users could read it: the whole configuration is
written to redis-server's stdin (`redis-server -`), not to its command line (visible in
`ps`) and not to a file. It is never logged; `repr()` and `redacted_url` hide it.

The process is stopped on `close()` / leaving the `with` block, and also at interpreter
exit (atexit), so a `tandem serve` that exits normally or via SystemExit never leaks it.
A SIGTERM only runs atexit handlers if the program turns it into SystemExit (a signal
handler in the CLI); a SIGKILLed parent cannot clean up, so the server would outlive it.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tandem.workers.control_plane import redact_url

logger = logging.getLogger(__name__)

_LOG_TAIL_CHARS = 2000
_PORT_IN_USE = "Address already in use"

_live: set[LocalRedis] = set()
_live_lock = threading.Lock()


def _config_quote(value: str) -> str:
    """`value` as a double-quoted redis.conf argument (the parser understands \\xHH)."""
    out = []
    for byte in value.encode("utf-8"):
        char = chr(byte)
        if char in '"\\' or not 0x20 <= byte < 0x7F:
            out.append(f"\\x{byte:02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _free_port(host: str) -> int:
    # The port is free now; another process may take it before redis binds it, which
    # the caller detects (redis exits with "Address already in use") and retries.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_redis_server(binary: str | None = None) -> str:
    """Absolute path of the redis-server executable; FileNotFoundError if there is none."""
    candidates = [binary] if binary else ["redis-server", "/usr/bin/redis-server"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    raise FileNotFoundError(
        f"redis-server not found (looked for {', '.join(candidates)}): install Debian's "
        "redis-server (apt-get install redis-server) or pass --redis-url of a running Redis"
    )


class LocalRedis:
    """A redis-server child process on 127.0.0.1 (a context manager).

    `stop()` / `start()` / `restart()` keep the port, for fault-injection tests: clients
    configured with `url` reconnect to the restarted server. `close()` stops it for good.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        binary: str | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
        port_attempts: int = 5,
    ) -> None:
        """
        password: require this password (requirepass); None: no authentication.
        binary: redis-server executable (default: from PATH, else /usr/bin/redis-server).
        start_timeout_s: how long to wait for PING to answer after starting.
        stop_timeout_s: how long SIGTERM gets before SIGKILL.
        port_attempts: free ports tried when another process takes the chosen one first.
        """
        if password is not None and (not isinstance(password, str) or not password):
            raise ValueError("password must be a non-empty str or None")
        if password is not None and "\x00" in password:
            raise ValueError("password must not contain NUL")
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s!r}")
        if not stop_timeout_s > 0:
            raise ValueError(f"stop_timeout_s must be > 0, got {stop_timeout_s!r}")
        if not isinstance(port_attempts, int) or port_attempts < 1:
            raise ValueError(f"port_attempts must be an int >= 1, got {port_attempts!r}")
        self.host = "127.0.0.1"
        self._password = password
        self._binary = find_redis_server(binary)
        self._start_timeout_s = float(start_timeout_s)
        self._stop_timeout_s = float(stop_timeout_s)
        self._port_attempts = port_attempts
        self._port: int | None = None
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file = None

    # -- properties ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("LocalRedis has not been started")
        return self._port

    @property
    def url(self) -> str:
        """redis:// URL for clients, with the password when one is set (keep it out of logs)."""
        return self._url_for(self.port)

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __repr__(self) -> str:
        where = self.redacted_url if self._port is not None else "not started"
        return f"LocalRedis({where}, running={self.running})"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> LocalRedis:
        """Start the server (on its previous port if it ran before) and wait for PING."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="tandem-redis-"))
        with _live_lock:
            _live.add(self)
        if self._port is not None:
            self._launch(self._port)
            return self
        for attempt in range(1, self._port_attempts + 1):
            port = _free_port(self.host)
            try:
                self._launch(port)
            except _PortTaken:
                logger.info("port %d was taken before redis bound it (attempt %d)", port, attempt)
                continue
            self._port = port
            return self
        raise RuntimeError(f"redis-server: no free port after {self._port_attempts} attempts")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after stop_timeout_s); keeps the port."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self._stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("redis-server pid %d ignored SIGTERM; killing it", process.pid)
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> None:
        """Stop and start again on the same port (its data is gone: no persistence)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory; the object cannot be restarted."""
        self.stop()
        with _live_lock:
            _live.discard(self)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _config(self, port: int) -> str:
        assert self._dir is not None
        lines = [
            f"bind {self.host}",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            f"dir {_config_quote(str(self._dir))}",
            'save ""',
            "appendonly no",
            'logfile ""',
        ]
        if self._password is not None:
            lines.append(f"requirepass {_config_quote(self._password)}")
        return "\n".join(lines) + "\n"

    def _launch(self, port: int) -> None:
        assert self._dir is not None
        log_path = self._dir / "redis.log"
        self._log_file = open(log_path, "ab")  # closed in stop()
        start_offset = self._log_file.tell()
        process = subprocess.Popen(
            [self._binary, "-"],
            stdin=subprocess.PIPE,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
        )
        self._process = process
        assert process.stdin is not None
        try:
            process.stdin.write(self._config(port).encode("utf-8"))
            process.stdin.close()
        except BrokenPipeError:
            pass  # it exited before reading its config; _wait_ready reports its output
        try:
            self._wait_ready(process, port, log_path, start_offset)
        except BaseException:
            self.stop()
            raise
        logger.info("redis-server pid %d serving %s", process.pid, redact_url(self._url_for(port)))

    def _url_for(self, port: int) -> str:
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        return f"redis://{auth}{self.host}:{port}/0"

    def _wait_ready(
        self, process: subprocess.Popen[bytes], port: int, log_path: Path, offset: int
    ) -> None:
        client = redis.Redis(
            host=self.host,
            port=port,
            password=self._password,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + self._start_timeout_s
        try:
            while True:
                if process.poll() is not None:
                    tail = _tail(log_path, offset)
                    if _PORT_IN_USE in tail:
                        raise _PortTaken(f"port {port} is in use")
                    raise RuntimeError(
                        f"redis-server exited with status {process.returncode} on start; "
                        f"its log ends:\n{tail}"
                    )
                try:
                    # Asking for the pid, not just PING, proves the answer comes from our
                    # process and not from whoever else listens on the port.
                    if client.info("server")["process_id"] == process.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not answer PING within {self._start_timeout_s} s; "
                        f"its log ends:\n{_tail(log_path, offset)}"
                    )
                time.sleep(0.02)
        finally:
            client.close()


class _PortTaken(RuntimeError):
    pass


def _tail(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except OSError as error:
        return f"<log unreadable: {error}>"
    return text[-_LOG_TAIL_CHARS:].strip()


@atexit.register
def _stop_all_at_exit() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        server.close()
