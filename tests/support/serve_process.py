"""`tandem serve` as a child process: its output collected line by line, ready when it
prints the gRPC target, stopped by SIGTERM, and killed with its whole session (Ray, the
private redis-server) whatever happens."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

READY_PREFIX = "tandem: gRPC on"


class ServeProcess:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(READY_PREFIX):
                self._ready.set()

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    def wait_ready(self, timeout_s: float) -> None:
        """Until the server prints its target; fails at once if it exits first."""
        for _ in range(int(timeout_s)):
            if self._ready.wait(1) or self.proc.poll() is not None:
                break
        assert self._ready.is_set(), self.tail()

    def stop(self, timeout_s: float = 90) -> int:
        """SIGTERM, then the exit status (a clean stop is 0)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


@contextlib.contextmanager
def serve_process(
    command: Sequence[str], env: Mapping[str, str], cwd: str | Path | None = None
) -> Iterator[ServeProcess]:
    proc = subprocess.Popen(
        list(command), cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        yield ServeProcess(proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
