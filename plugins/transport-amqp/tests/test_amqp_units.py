"""The plugin's pure parts, without a broker: delay routing, queue declarations,
delivery counts, options and TLS defaults."""

from __future__ import annotations

import os
import re
import ssl

import attrs
import pytest
from kernel_amqp import counting, delayed, queues
from kernel_amqp.options import AmqpOptions, split_options
from kernel_amqp.transport import tls_options, written_hostname
from kombu import Exchange, Queue

from kernel.exceptions import ConfigurationError

# -- delayed delivery ------------------------------------------------------------------


def topic_matches(pattern: str, key: str) -> bool:
    """RabbitMQ's topic matching: ``*`` one word, ``#`` zero or more."""
    words, parts = pattern.split("."), key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(words):
            return j == len(parts)
        if words[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(parts) + 1))
        return j < len(parts) and words[i] in ("*", parts[j]) and match(i + 1, j + 1)

    return match(0, 0)


def route_through(topology: delayed.Topology, key: str) -> tuple[int, str]:
    """Follow a message through the topology as RabbitMQ would: (seconds waited, the
    exchange it leaves by)."""
    ttl = {queue.name: queue.arguments["x-message-ttl"] // 1000 for queue in topology.queues}
    dead_letter = {
        queue.name: queue.arguments["x-dead-letter-exchange"] for queue in topology.queues
    }
    exchange, waited = topology.exchanges[0], 0
    for _ in range(200):
        targets = [
            b for b in topology.bindings if b.source == exchange and topic_matches(b.pattern, key)
        ]
        assert len(targets) == 1, f"{key} at {exchange}: routed to {targets}"
        (binding,) = targets
        if binding.to_exchange:
            exchange = binding.destination
        else:
            waited += ttl[binding.destination]
            exchange = dead_letter[binding.destination]
        if exchange == delayed.delivery_exchange():
            return waited, exchange
    raise AssertionError("the message never left the topology")


@pytest.mark.parametrize("seconds", [1, 2, 3, 5, 60, 61, 3600, 86_400 * 3 + 17, delayed.MAX_DELAY])
def test_a_delayed_message_waits_exactly_its_delay_in_the_topology(seconds):
    topology = delayed.topology()
    key = delayed.delayed_routing_key(seconds, "video")
    assert route_through(topology, key) == (seconds, "celery_delayed_delivery")
    assert sum(2**level for level in delayed.iter_levels(seconds)) == seconds


def test_routing_keys_and_names_are_celerys():
    from kombu.transport import native_delayed_delivery as celery_side

    for seconds in (1, 2, 7, 1000, delayed.MAX_DELAY):
        assert delayed.delayed_routing_key(seconds, "q.x") == celery_side.calculate_routing_key(
            seconds, "q.x"
        )
    assert delayed.level_name(27) == celery_side.level_name(27)
    assert delayed.level_name(0, "tenant") == celery_side.level_name(0, "tenant")
    assert delayed.delivery_exchange() == celery_side.CELERY_DELAYED_DELIVERY_EXCHANGE


def test_a_redelayed_key_does_not_grow_and_the_binding_matches_exactly():
    once = delayed.delayed_routing_key(5, "video")
    twice = delayed.delayed_routing_key(9, once)
    assert delayed.strip_delay(twice) == "video"
    assert topic_matches(delayed.binding_key("video"), twice)
    assert not topic_matches(
        delayed.binding_key("video"), delayed.delayed_routing_key(9, "x.video")
    )
    assert topic_matches(
        delayed.binding_key("media.video.#"), delayed.delayed_routing_key(3, "media.video.hd")
    )


def test_delays_are_rounded_up_to_whole_seconds():
    assert delayed.delay_seconds(100.0, 100.0) == 0
    assert delayed.delay_seconds(100.0, 101.0) == 0
    assert delayed.delay_seconds(100.2, 100.0) == 1
    assert delayed.delay_seconds(102.0, 100.0) == 2
    assert delayed.delay_seconds(102.001, 100.0) == 3
    with pytest.raises(ValueError):
        delayed.delayed_routing_key(0, "video")


def test_topology_arguments_are_celerys_for_quorum_delay_queues():
    topology = delayed.topology("quorum", "p")
    top, bottom = topology.queues[0], topology.queues[-1]
    assert top.name == "p_celery_delayed_27"
    assert top.arguments == {
        "x-queue-type": "quorum",
        "x-overflow": "reject-publish",
        "x-message-ttl": 2**27 * 1000,
        "x-dead-letter-exchange": "p_celery_delayed_26",
        "x-dead-letter-strategy": "at-least-once",
    }
    assert bottom.arguments["x-dead-letter-exchange"] == "p_celery_delayed_delivery"
    assert "x-dead-letter-strategy" not in delayed.topology("classic").queues[0].arguments


# -- queue declarations ------------------------------------------------------------------


def test_shared_queues_get_the_default_type_and_options():
    options = AmqpOptions(queue_type="quorum", delivery_limit=5, dead_letter_queue="dead")
    plan = queues.plan(options, "tasks", True, False, False, None)
    assert plan.kind == "quorum"
    assert plan.arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "dead",
    }
    assert (
        "x-dead-letter-exchange"
        not in queues.plan(options, "dead", True, False, False, None).arguments
    )


def test_private_reply_and_internal_queues_keep_their_arguments():
    options = AmqpOptions(queue_type="quorum", max_priority=10)
    assert queues.plan(
        options, "w1.celery.pidbox", False, False, True, {"x-expires": 10}
    ).arguments == {"x-expires": 10}
    reply = queues.plan(
        options, "kernel.reply.abc", True, False, False, {"x-queue-type": "classic"}
    )
    assert reply.arguments == {"x-queue-type": "classic"} and reply.kind == "classic"
    assert queues.plan(
        options, "celery_delayed_3", True, False, False, {"a": 1}, internal=True
    ).arguments == {"a": 1}


def test_quorum_queues_drop_max_priority_and_configuration_wins():
    options = AmqpOptions(
        max_priority=10,
        queue_arguments={"video": {"x-queue-type": "quorum", "x-max-length": 100}},
    )
    assert queues.plan(options, "audio", True, False, False, None).arguments == {
        "x-queue-type": "classic",
        "x-max-priority": 10,
    }
    video = queues.plan(options, "video", True, False, False, {"x-max-priority": 5})
    assert video.kind == "quorum"
    # by default nothing Celery would not declare too (review 2, finding 1)
    assert video.arguments == {"x-queue-type": "quorum", "x-max-length": 100}
    assert video.dropped == ("x-max-priority",)
    # a delivery limit, when asked for, dead-letters to the kernel's dead-letter queue
    limited = queues.plan(
        attrs.evolve(options, delivery_limit=20), "video", True, False, False, None
    )
    assert limited.arguments == {
        "x-queue-type": "quorum",
        "x-max-length": 100,
        "x-delivery-limit": 20,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "kernel.dead_letter",
    }


def test_queue_definitions_come_from_kombu_queues_or_dicts():
    options = AmqpOptions(
        queues=[
            Queue(
                "video",
                Exchange("media", "topic"),
                routing_key="media.video.#",
                queue_arguments={"x-queue-type": "quorum"},
            ),
            {
                "name": "audio",
                "exchange": "media",
                "exchange_type": "topic",
                "routing_key": "media.audio.#",
            },
        ]
    )
    assert options.definition("video").arguments == {"x-queue-type": "quorum"}
    assert options.definition("audio").routing_key == "media.audio.#"
    assert options.exchange_type("media") == "topic"
    assert queues.plan(options, "video", True, False, False, None).kind == "quorum"


def test_inequivalent_declarations_are_recognised():
    class Refused(Exception):
        reply_code = 406
        reply_text = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q'"

    class Invalid(Refused):
        reply_text = "PRECONDITION_FAILED - invalid arg 'x-max-priority'"

    assert queues.is_inequivalent(Refused())
    assert not queues.is_inequivalent(Invalid())


# -- delivery counts ---------------------------------------------------------------------


def test_published_count_survives_a_quorum_queue_and_ignores_its_returns():
    headers = counting.on_publish({"id": "t", "x-delivery-count": 2})
    assert headers == {"id": "t", "x-kernel-delivery-count": 2}
    # classic queue: the headers come back as published
    assert counting.on_receive(dict(headers))["x-delivery-count"] == 2
    # quorum queue: its own count of returns (raised by any channel closed holding the
    # message, prefetched or held for an ETA) is not the kernel's: only attempts count
    assert counting.on_receive({**headers, "x-delivery-count": 1}) == {
        "id": "t",
        "x-delivery-count": 2,
    }
    assert counting.on_receive({"id": "t", "x-delivery-count": 3}) == {"id": "t"}
    assert counting.on_receive({"id": "t"}) == {"id": "t"}
    assert counting.on_publish({"x-delivery-count": 0, "x-kernel-delivery-count": 4}) == {}


# -- options and TLS ---------------------------------------------------------------------


def test_options_are_split_from_py_amqp_ones_and_checked():
    options, rest = split_options(
        {"queue_type": "quorum", "heartbeat": 10, "confirm_publish": True}
    )
    assert options.queue_type == "quorum"
    assert rest == {"heartbeat": 10, "confirm_publish": True}
    with pytest.raises(ConfigurationError, match="queue type 'stream'"):
        AmqpOptions(queue_type="stream")
    with pytest.raises(ConfigurationError, match="max_priority"):
        AmqpOptions(max_priority=1000)
    with pytest.raises(ConfigurationError, match="delivery_limit"):
        AmqpOptions(delivery_limit=0)
    with pytest.raises(ConfigurationError, match=re.escape("queue_arguments")):
        AmqpOptions(queue_arguments={"q": 1})
    with pytest.raises(ConfigurationError, match="queues"):
        AmqpOptions(queues=[{"exchange": "x"}])


def test_queues_option_keeps_a_kombu_queues_attributes_as_arguments():
    video = Queue(
        "video",
        Exchange("media", "topic"),
        routing_key="media.video.#",
        max_priority=5,
        expires=10,
        message_ttl=1.5,
        max_length=3,
        queue_arguments={"x-overflow": "reject-publish"},
    )
    (definition,) = AmqpOptions(queues=[video]).queues
    assert (definition.exchange, definition.exchange_type) == ("media", "topic")
    assert definition.arguments == {
        "x-overflow": "reject-publish",
        "x-max-priority": 5,
        "x-expires": 10_000,
        "x-message-ttl": 1500,
        "x-max-length": 3,
    }
    declared = queues.plan(AmqpOptions(queues=[video]), "video", True, False, False, None)
    assert declared.arguments["x-message-ttl"] == 1500
    assert declared.arguments["x-max-priority"] == 5


def test_queues_option_refuses_a_queue_with_several_bindings():
    from kombu import binding

    both = Queue("both", bindings=[binding(Exchange("a"), "a"), binding(Exchange("b"), "b")])
    with pytest.raises(ConfigurationError, match="task_queues"):
        AmqpOptions(queues=[both])


def test_tls_checks_the_server_name_unless_told_not_to_verify():
    assert tls_options(True, "broker.example.com:5671") == {"server_hostname": "broker.example.com"}
    assert tls_options({"ca_certs": "ca.pem"}, "10.0.0.1:5671") == {
        "ca_certs": "ca.pem",
        "server_hostname": "10.0.0.1",
    }
    assert tls_options({"server_hostname": "other"}, "h:1")["server_hostname"] == "other"
    assert tls_options({"cert_reqs": ssl.CERT_NONE}, "h:1") == {"cert_reqs": ssl.CERT_NONE}


def test_unknown_transport_options_are_refused_with_the_known_ones():
    with pytest.raises(ConfigurationError, match="'queue_typ'") as info:
        split_options({"queue_typ": "quorum"})
    assert "queue_type" in str(info.value) and "heartbeat" in str(info.value)
    ours, rest = split_options({"heartbeat": 10, "confirm_publish": True, "max_retries": 3})
    assert rest == {"heartbeat": 10, "confirm_publish": True, "max_retries": 3}
    assert ours.confirm_timeout == 30.0
    with pytest.raises(ConfigurationError, match="confirm_timeout"):
        AmqpOptions(confirm_timeout=0)


def test_rpc_reply_queue_expiry_is_bounded_whatever_result_expires():
    from kernel_amqp.rpc import DEFAULT_QUEUE_EXPIRES, _url_options
    from kernel_amqp.rpc_channel import reply_queue

    assert _url_options("rpc://")["queue_expires"] == DEFAULT_QUEUE_EXPIRES == 86400
    assert _url_options("rpc://?queue_expires=600")["queue_expires"] == 600
    with pytest.raises(ConfigurationError, match="queue_expires"):
        _url_options("rpc://?queue_expires=never")
    assert reply_queue("kernel.reply.x", DEFAULT_QUEUE_EXPIRES).expires == 86400


def test_rpc_subtasks_inherit_the_reply_queue_only_as_canvas_steps():
    from types import SimpleNamespace

    from kernel_amqp.rpc import is_canvas_step

    plain = SimpleNamespace(callbacks=[], errbacks=[], chain=[], chord=None)
    assert not is_canvas_step(plain, {"id": "a", "task": "inner"})
    step = {"task": "inner", "options": {"task_id": "b"}}
    chained = SimpleNamespace(callbacks=[], errbacks=[], chain=[step], chord=None)
    assert is_canvas_step(chained, {"id": "b", "task": "inner"})
    assert not is_canvas_step(chained, {"id": "c", "task": "inner"})
    linked = SimpleNamespace(callbacks=[{"task": "cb", "options": {}}], errbacks=[], chain=[])
    assert is_canvas_step(linked, {"id": "d", "task": "cb"})


# -- reply addresses ---------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_reply_book_is_empty_in_a_forked_child():
    from kernel_amqp import replies

    replies.remember("task-in-parent", "reply-queue", "corr")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it sees, then leave without cleanup
        try:
            seen = replies.lookup("task-in-parent")
            replies.remember("task-in-child", "q", None)  # the lock works in the child
            os.write(write_end, repr((seen, replies.lookup("task-in-child"))).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as stream:
            child_saw = stream.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert child_saw == repr((None, ("q", None)))
        assert replies.lookup("task-in-parent") == ("reply-queue", "corr")  # parent keeps it
    finally:
        replies.clear()


def test_tls_name_is_the_host_the_url_wrote_not_kombus_rewrite():
    from kombu import Connection

    client = Connection("amqps://guest:guest@localhost:5671//")
    assert written_hostname(client) == "localhost"
    client.hostname = "127.0.0.1"  # what kombu's py-amqp transport does on connect
    assert written_hostname(client) == "localhost"
    assert written_hostname(Connection("amqps://127.0.0.1:5671//")) == "127.0.0.1"
    assert tls_options(True, "127.0.0.1:5671", server_name="localhost") == {
        "server_hostname": "localhost"
    }


def test_quorum_queues_dead_letter_to_the_apps_task_dead_letter_queue():
    from kernel import App

    app = App("dl", broker="amqp://guest:guest@127.0.0.1:5672//", task_dead_letter_queue="mine")
    connection = app.connection()
    assert connection.transport_options["kernel_dead_letter_queue"] == "mine"
    options, _ = split_options(connection.transport_options)
    plan = queues.plan(
        attrs.evolve(options, queue_type="quorum", delivery_limit=20), "t", True, False, False, None
    )
    assert plan.arguments["x-dead-letter-routing-key"] == "mine"
    # the user's broker_transport_options still win
    app = App(
        "dl2",
        broker="amqp://guest:guest@127.0.0.1:5672//",
        broker_transport_options={"kernel_dead_letter_queue": "theirs"},
    )
    assert app.connection().transport_options["kernel_dead_letter_queue"] == "theirs"
    with pytest.raises(ConfigurationError, match="kernel_dead_letter_queue"):
        AmqpOptions(kernel_dead_letter_queue="")
