"""A private Redis database for this test run, flushed before and after."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kernel.testing.services import require_service


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
