"""Replica counts per pool over a run, read from the control plane's registry in Redis
(the same records the router places by), once a second on a thread of its own."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import redis

from tandem.workers.control_plane import KeySpace
from tandem.workers.control_plane.registry import fetch_live_workers


class ReplicaSampler:
    """`samples` holds (t, {role: live replicas}) with t from `clock`; a Redis error
    leaves a gap rather than a wrong count."""

    def __init__(
        self, redis_url: str, cluster: str, clock: Callable[[], float], interval_s: float = 1.0
    ) -> None:
        self.client = redis.Redis.from_url(redis_url, decode_responses=True,
                                           socket_timeout=interval_s)
        self.keys = KeySpace(cluster)
        self.clock = clock
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replica-sampler", daemon=True)

    def sample(self) -> None:
        try:
            workers = fetch_live_workers(self.client, self.keys)
        except redis.RedisError:
            return
        self.samples.append((self.clock(), dict(Counter(w.role for w in workers))))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ReplicaSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        self.client.close()
