"""kernel's contracts, passed against the real RabbitMQ: the transport on classic and
on quorum queues, and the rpc:// result backend."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Queue

from kernel.plugins.manager import PluginManager
from kernel.testing.contracts import BackendContract, TransportContract
from kernel.testing.contracts.transport import ContractBroker

TRANSPORT = "kernel_amqp.transport:Transport"


class TestAmqpTransport(TransportContract):
    """Classic queues: every feature but counted redelivery, which they lack."""

    transport = TRANSPORT
    features = frozenset({"priority", "fanout", "delayed_delivery", "redelivery_on_close"})

    @pytest.fixture
    def transport_url(self, rabbitmq_url):
        return rabbitmq_url

    @pytest.fixture
    def transport_options(self, delay_prefix):
        return {"confirm_publish": True, "delayed_delivery_prefix": delay_prefix}


class QuorumContractBroker(ContractBroker):
    """The contract's queues as quorum queues (which must be durable)."""

    def queue(self, exchange: Any = None, **kwargs: Any) -> Queue:
        queue = super().queue(exchange, **kwargs)
        return Queue(
            queue.name,
            queue.exchange,
            routing_key=queue.routing_key,
            durable=True,
            auto_delete=False,
            queue_arguments={**(queue.queue_arguments or {}), "x-queue-type": "quorum"},
        )


class TestAmqpQuorumTransport(TransportContract):
    """Quorum queues: no priorities before RabbitMQ 4. Their own return count is not
    the kernel's (see ``kernel_amqp.counting``): no ``delivery_count`` feature."""

    transport = TRANSPORT
    features = frozenset({"fanout", "delayed_delivery", "redelivery_on_close"})

    @pytest.fixture
    def transport_url(self, rabbitmq_url):
        return rabbitmq_url

    @pytest.fixture
    def transport_options(self, delay_prefix):
        return {"confirm_publish": True, "delayed_delivery_prefix": delay_prefix}

    @pytest.fixture
    def broker(self, transport_url, transport_options) -> Iterator[QuorumContractBroker]:
        broker = QuorumContractBroker(
            transport_url, self.transport, transport_options, self.receive_timeout
        )
        yield broker
        broker.close()


class TestRpcBackend(BackendContract):
    """rpc:// in one process: results stored without a task's reply address go to
    this process's own reply queue, where it reads them (as the contract does)."""

    cross_process = False
    #: Apps the contract made itself (expiry tests), whose reply queues are deleted.
    made: list[Any] = []

    @pytest.fixture(scope="class")
    @classmethod
    def backend_plugins(cls) -> PluginManager:
        return PluginManager().load()

    @pytest.fixture(autouse=True)
    def _delete_reply_queues(self, broker, rabbitmq_url) -> Iterator[None]:
        #: the broker of the apps make_app() builds (the contract calls it directly)
        self.broker_url = rabbitmq_url
        yield
        while self.made:
            backend = self.made.pop()._backend
            if backend is not None:
                broker.track(queue=backend.reply_queue_name)

    @pytest.fixture
    def backend_url(self):
        return "rpc://"

    @pytest.fixture
    def backend_app(self, rabbitmq_url, backend_plugins, delay_prefix, broker) -> Iterator[Any]:
        from kernel.app import App

        app = App(
            "rpc-contract",
            broker=rabbitmq_url,
            backend="rpc://",
            plugins=backend_plugins,
            broker_transport_options={"delayed_delivery_prefix": delay_prefix},
        )
        yield app
        broker.track(queue=app.backend.reply_queue_name)
        app.close()

    def make_app(self, backend_url: str, plugins: PluginManager, **settings: Any) -> Any:
        from kernel.app import App

        app = App(
            "rpc-contract",
            broker=self.broker_url,
            backend=backend_url,
            plugins=plugins,
            **settings,
        )
        self.made.append(app)
        return app
