"""The serializer contract: what the kernel relies on from a serializer plugin.

Use it from a plugin's tests::

    from kernel.testing.contracts import SerializerContract


    class TestMsgpackSerializer(SerializerContract):
        serializer_name = "msgpack"

``serializer_name`` may be a class attribute or a fixture. The contract builds an
``App(broker="memory://", plugins=...)`` whose ``serialization`` registers every
plugin's serializers with kombu, then encodes and decodes through kombu's own
``dumps``/``loads``, as publishing and consuming do. Plugins come from
``PluginManager().load()``; override the ``serializer_plugins`` fixture to register a
plugin by hand.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Exchange, Queue
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads

from kernel.app import App
from kernel.exceptions import ConfigurationError
from kernel.plugins.manager import PluginManager

#: Values every serializer must return unchanged (what JSON can express).
JSON_VALUES = [
    pytest.param({"answer": 42, "nested": {"list": [1, 2.5, None, True, False]}}, id="dict"),
    pytest.param([1, "two", 3.0, None, [], {}], id="list"),
    pytest.param("ünïcödé ✓ 漢字 🚀", id="unicode"),
    pytest.param("", id="empty-string"),
    pytest.param(None, id="none"),
    pytest.param(True, id="bool"),
    pytest.param(0, id="zero"),
    pytest.param(-(2**53), id="big-int"),
    pytest.param(0.1, id="float"),
    pytest.param([[], {"args": [1, 2], "kwargs": {"x": "y"}}, {"callbacks": None}], id="task-body"),
]


def _setting(test: object, request: pytest.FixtureRequest, name: str) -> Any:
    """A subclass's class attribute ``name``, else its fixture ``name``."""
    value = getattr(type(test), name, None)
    if isinstance(value, str):
        return value
    return request.getfixturevalue(name)


class SerializerContract:
    """Behaviour every serializer provides; subclass as ``TestXxx``."""

    #: The serializer's name (``SerializerSpec.name``); or provide a fixture.
    serializer_name: str | None = None
    #: Seconds to wait for a published message.
    receive_timeout: float = 5.0

    @pytest.fixture(scope="class")
    @classmethod
    def serializer_plugins(cls) -> PluginManager:
        """Plugins the contract's apps use; override to register a plugin by hand."""
        return PluginManager().load()

    @pytest.fixture
    def serializer(self, request: pytest.FixtureRequest) -> str:
        return _setting(self, request, "serializer_name")

    @pytest.fixture
    def serializer_app(self, serializer_plugins: PluginManager) -> Iterator[App]:
        app = App(
            "serializer-contract", broker="memory://", backend=None, plugins=serializer_plugins
        )
        app.finalize()
        yield app
        app.close()

    @pytest.fixture
    def spec(self, serializer_app: App, serializer: str) -> Any:
        return serializer_app.serialization.serializer_spec(serializer)

    # -- registration -------------------------------------------------------------------

    def test_spec_is_found_by_name_and_by_content_type(self, serializer_app, serializer, spec):
        assert spec.name == serializer
        assert serializer_app.serialization.by_content_type[spec.content_type] is spec

    def test_accept_content_entry_by_name_means_its_content_type(
        self, serializer_app, serializer, spec
    ):
        accepted = serializer_app.serialization.accepted_types([serializer])
        assert accepted == {spec.content_type}

    def test_dumps_labels_data_with_the_spec_content_type_and_encoding(self, serializer, spec):
        content_type, content_encoding, _data = dumps({"n": 1}, serializer=serializer)
        assert content_type == spec.content_type
        assert content_encoding == spec.content_encoding

    # -- round trips --------------------------------------------------------------------

    @pytest.mark.parametrize("value", JSON_VALUES)
    def test_json_value_round_trips(self, serializer, spec, value):
        content_type, content_encoding, data = dumps(value, serializer=serializer)
        decoded = loads(data, content_type, content_encoding, accept={spec.content_type})
        assert decoded == value
        assert type(decoded) is type(value)

    def test_message_published_with_it_reaches_an_accepting_consumer(
        self, serializer_app, serializer, spec
    ):
        queue_name = f"serializer-contract.{uuid.uuid4().hex}"
        queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)
        body = {"args": [1, "ü"], "kwargs": {"k": None}}
        with serializer_app.connection() as connection:
            connection.Producer().publish(
                body,
                exchange=queue.exchange,
                routing_key=queue_name,
                serializer=serializer,
                declare=[queue],
            )
            bound = queue(connection.default_channel)
            deadline = time.monotonic() + self.receive_timeout
            message = None
            while message is None and time.monotonic() < deadline:
                message = bound.get(no_ack=True, accept={spec.content_type})
                if message is None:
                    time.sleep(0.01)
            bound.delete()
        assert message is not None, f"no message arrived within {self.receive_timeout}s"
        assert message.content_type == spec.content_type
        assert message.payload == body

    # -- refusals -----------------------------------------------------------------------

    def test_unknown_serializer_name_raises_configuration_error(self, serializer_app, serializer):
        unknown = f"no-such-serializer-{uuid.uuid4().hex[:8]}"
        with pytest.raises(ConfigurationError, match=unknown) as raised:
            serializer_app.serialization.serializer_spec(unknown)
        assert serializer in str(raised.value), "the error should list the serializers available"

    def test_publishing_with_unknown_serializer_raises_configuration_error(self, serializer_app):
        with pytest.raises(ConfigurationError, match="no-such-serializer"):
            serializer_app.send_task("contract.task", serializer="no-such-serializer")

    def test_untrusted_serializer_is_refused_unless_in_accept_content(self, serializer_app, spec):
        if spec.trusted:
            pytest.skip(f"serializer {spec.name!r} is trusted")
        assert spec.name not in serializer_app.conf.accept_content
        content_type, content_encoding, data = dumps({"n": 1}, serializer=spec.name)
        accept = serializer_app.serialization.accepted_types(serializer_app.conf.accept_content)

        with pytest.raises(ContentDisallowed):
            loads(data, content_type, content_encoding, accept=accept)

    def test_serializer_listed_in_accept_content_is_accepted(self, serializer_app, spec):
        serializer_app.conf.accept_content = ["json", spec.name]
        content_type, content_encoding, data = dumps({"n": 1}, serializer=spec.name)
        accept = serializer_app.serialization.accepted_types(serializer_app.conf.accept_content)

        assert loads(data, content_type, content_encoding, accept=accept) == {"n": 1}
