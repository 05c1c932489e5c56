"""kernel's transport contract, passed by the Redis broker against the real Redis."""

from __future__ import annotations

import pytest

from kernel.testing.contracts import TransportContract


class TestRedisTransport(TransportContract):
    transport = "kernel_redis.transport:Transport"
    features = frozenset(
        {"priority", "fanout", "redelivery_on_close", "delayed_delivery", "delivery_count"}
    )
    transport_options = {"visibility_timeout": 2}

    @pytest.fixture
    def transport_url(self, redis_db):
        return redis_db
