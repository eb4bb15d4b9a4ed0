"""pytest fixtures for a real redis-server (Debian's), started through `LocalRedis`.

Import them into a conftest.py or a test module:

    from tests.support.redis_fixtures import private_redis, redis_server, redis_url  # noqa: F401

- `redis_server` (session): one server for the whole run.
- `redis_url` (test): that server's URL, emptied (FLUSHALL) before the test.
- `private_redis` (test): a server of the test's own, free to stop, restart or kill.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tandem.cluster.redis_server import LocalRedis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def private_redis() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server
