"""What every recorded run names: the commit it ran at and the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path


def commit() -> str:
    """The short id of the checkout's HEAD ("unknown" outside a git checkout)."""
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
    )
    return done.stdout.strip() or "unknown"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def stamp() -> dict[str, object]:
    """date (UTC), commit, machine and the load average now: the head of a run's JSON."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit(),
        "machine": machine(),
        "load_average": os.getloadavg(),
    }
