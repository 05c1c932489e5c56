"""A private Redis database for this test run, flushed before and after; per test, that
database emptied (``redis_url``), worker subprocesses on it (``cluster``), and a
``redis-server`` of the test's own that it may stop and restart (``own_redis``)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import RedisCluster, RedisServer

from kernel.testing.services import require_service, services_required


@pytest.fixture(scope="session")
def redis_db() -> Iterator[str]:
    """``redis://127.0.0.1:6379/<n>``: a database number of this run's own."""
    host, port = require_service("redis")
    import redis

    number = 1 + os.getpid() % 15
    client = redis.Redis(host=host, port=port, db=number)
    client.flushdb()
    yield f"redis://{host}:{port}/{number}"
    client.flushdb()
    client.close()


@pytest.fixture
def redis_url(redis_db: str) -> str:
    """``redis_db``, emptied for this test: queues, results and records start blank."""
    import redis

    client = redis.Redis.from_url(redis_db)
    client.flushdb()
    client.close()
    return redis_db


@pytest.fixture
def cluster(tmp_path: Path, redis_url: str) -> Iterator[RedisCluster]:
    """Workers, a client app and the record store of one test, all on ``redis_url``;
    every worker is stopped (and its process group killed) at teardown."""
    instance = RedisCluster(tmp_path, redis_url)
    yield instance
    instance.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A running ``redis-server`` of this test's own (fsync-always AOF, its own port and
    directory) that the test may stop and start again; killed at teardown."""
    if not RedisServer.available():
        message = "redis-server is not on PATH; install Redis to run this test"
        if services_required():
            pytest.fail(f"{message} (KERNEL_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(message)
    server = RedisServer(tmp_path / "own-redis")
    try:
        yield server.start()
    finally:
        server.stop(signal.SIGKILL)
