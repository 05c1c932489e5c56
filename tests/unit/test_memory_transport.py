"""kombu's in-process memory transport against the transport contract."""

from __future__ import annotations

import pytest
from kombu.transport import memory

from kernel.testing.contracts import TransportContract


class TestMemoryTransport(TransportContract):
    transport = memory.Transport
    features = frozenset({"fanout"})

    @pytest.fixture
    def transport_url(self):
        return "memory://"
