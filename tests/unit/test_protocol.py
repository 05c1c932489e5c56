"""Celery Message Protocol v2: building and decoding task messages."""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from kombu import Queue
from kombu.serialization import dumps, loads

from kernel.exceptions import ProtocolError
from kernel.protocol import REPR_LIMIT, build_task_message, decode_task

ETA = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
EXPIRES = ETA + timedelta(hours=1)
CALLBACK = {
    "task": "proj.log",
    "args": [],
    "kwargs": {},
    "options": {},
    "subtask_type": None,
    "immutable": False,
    "chord_size": None,
}


def full_message():
    return build_task_message(
        name="proj.tasks.add",
        task_id="id-1",
        args=(2, 3),
        kwargs={"z": "ü"},
        eta=ETA,
        expires=EXPIRES,
        retries=2,
        group_id="group-1",
        group_index=0,
        root_id="root-1",
        parent_id="parent-1",
        time_limit=30.0,
        soft_time_limit=20.0,
        callbacks=[CALLBACK],
        errbacks=[],
        reply_to="replies",
        shadow="alias",
    )


def over_the_wire(message):
    """JSON-encode and decode a message body as a broker round trip would."""
    content_type, encoding, data = dumps(message.body, serializer="json")
    return loads(data, content_type, encoding, accept={"application/json"})


# ----------------------------------------------------------------------- building


def test_headers_carry_every_protocol_v2_field():
    headers = full_message().headers

    assert headers["lang"] == "py"
    assert headers["task"] == "proj.tasks.add"
    assert headers["id"] == "id-1"
    assert headers["root_id"] == "root-1"
    assert headers["parent_id"] == "parent-1"
    assert headers["group"] == "group-1"
    assert headers["group_index"] == 0
    assert headers["shadow"] == "alias"
    assert headers["eta"] == ETA.isoformat()
    assert headers["expires"] == EXPIRES.isoformat()
    assert headers["retries"] == 2
    assert headers["timelimit"] == [30.0, 20.0]  # (hard, soft), as Celery orders them
    assert headers["argsrepr"] == repr([2, 3])
    assert headers["kwargsrepr"] == repr({"z": "ü"})
    assert headers["replaced_task_nesting"] == 0
    assert headers["ignore_result"] is False


def test_origin_header_names_this_process_and_host():
    headers = full_message().headers
    assert headers["origin"] == f"gen{os.getpid()}@{socket.gethostname()}"


def test_properties_carry_correlation_id_and_reply_to():
    assert full_message().properties == {"correlation_id": "id-1", "reply_to": "replies"}


def test_body_is_args_kwargs_and_embed():
    args, kwargs, embed = full_message().body

    assert args == [2, 3]
    assert kwargs == {"z": "ü"}
    assert embed == {"callbacks": [CALLBACK], "errbacks": [], "chain": None, "chord": None}


def test_minimal_message_uses_protocol_defaults():
    message = build_task_message(name="proj.ping", task_id="id-2")

    assert message.body == (
        [],
        {},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    )
    headers = message.headers
    assert headers["root_id"] == "id-2"  # a task without parent is its own root
    assert headers["parent_id"] is None
    assert headers["group"] is None
    assert headers["eta"] is None
    assert headers["expires"] is None
    assert headers["retries"] == 0
    assert headers["timelimit"] == [None, None]
    assert message.properties == {"correlation_id": "id-2", "reply_to": ""}


def test_long_arguments_are_cut_in_argsrepr():
    message = build_task_message(name="proj.big", task_id="id-3", args=["x" * 5000])

    assert len(message.headers["argsrepr"]) == REPR_LIMIT
    assert message.headers["argsrepr"].endswith("...")
    assert message.body[0] == ["x" * 5000]


def test_given_argsrepr_hides_the_arguments():
    message = build_task_message(
        name="proj.login", task_id="id-4", args=["secret"], argsrepr="('***',)", kwargsrepr="{}"
    )
    assert message.headers["argsrepr"] == "('***',)"
    assert message.headers["kwargsrepr"] == "{}"


def test_extra_headers_are_added():
    message = build_task_message(
        name="proj.x", task_id="id-5", extra_headers={"x-deliver-at": 123.0}
    )
    assert message.headers["x-deliver-at"] == 123.0
    assert message.headers["task"] == "proj.x"


def test_published_message_has_json_content_type_and_v2_layout(kernel_app):
    @kernel_app.task
    def add(x, y):
        return x + y

    result = add.apply_async((2, 3), countdown=60)

    with kernel_app.connection() as connection:
        queue = kernel_app.queues_for([kernel_app.conf.task_default_queue])[0]
        message = queue(connection.default_channel).get(no_ack=True)
    assert message is not None
    assert message.content_type == "application/json"
    assert message.content_encoding == "utf-8"
    assert message.properties["correlation_id"] == result.id
    assert message.headers["id"] == result.id
    assert message.headers["task"] == add.name
    assert message.headers["lang"] == "py"
    assert datetime.fromisoformat(message.headers["eta"]) > datetime.now(timezone.utc)
    assert message.payload == [
        [2, 3],
        {},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]


# ----------------------------------------------------------------------- decoding


def test_decode_round_trip_restores_every_field():
    message = full_message()
    decoded = decode_task(message.headers, message.properties, over_the_wire(message))

    assert decoded.id == "id-1"
    assert decoded.name == "proj.tasks.add"
    assert decoded.args == (2, 3)
    assert decoded.kwargs == {"z": "ü"}
    assert decoded.eta == ETA
    assert decoded.expires == EXPIRES
    assert decoded.retries == 2
    assert decoded.time_limits == (30.0, 20.0)  # (hard, soft), as on the wire
    assert decoded.root_id == "root-1"
    assert decoded.parent_id == "parent-1"
    assert decoded.group_id == "group-1"
    assert decoded.reply_to == "replies"
    assert decoded.callbacks == [CALLBACK]
    assert decoded.errbacks == []
    assert decoded.chain == []
    assert decoded.delivery_count == 0


def test_decode_reads_the_delivery_count_header():
    message = build_task_message(
        name="proj.x", task_id="id-6", extra_headers={"x-delivery-count": 2}
    )
    decoded = decode_task(message.headers, message.properties, over_the_wire(message))
    assert decoded.delivery_count == 2


def test_naive_eta_is_read_as_utc():
    message = build_task_message(name="proj.x", task_id="id-7")
    headers = {**message.headers, "eta": "2030-01-02T03:04:05"}

    decoded = decode_task(headers, {}, over_the_wire(message))
    assert decoded.eta == ETA


def test_celery_message_without_optional_headers_decodes():
    headers = {"lang": "py", "task": "proj.x", "id": str(uuid.uuid4())}

    decoded = decode_task(headers, {}, [[1], {}, None])
    assert decoded.args == (1,)
    assert decoded.embed == {}
    assert decoded.time_limits == (None, None)
    assert decoded.eta is None


def test_protocol_v1_message_is_rejected_naming_protocol_v1():
    body = {"task": "proj.add", "id": "id-8", "args": [1, 2], "kwargs": {}}
    with pytest.raises(ProtocolError, match="protocol v1") as raised:
        decode_task({}, {}, body)
    assert "proj.add" in str(raised.value)


@pytest.mark.parametrize(
    "headers, missing",
    [
        ({}, "'task', 'id'"),
        ({"id": "id-9"}, "'task'"),
        ({"task": "proj.x"}, "'id'"),
    ],
    ids=["none", "no-task", "no-id"],
)
def test_missing_headers_are_named_in_the_error(headers, missing):
    with pytest.raises(ProtocolError, match=f"missing header\\(s\\) \\[{missing}\\]"):
        decode_task(headers, {}, [[], {}, {}])


@pytest.mark.parametrize(
    "body",
    [
        [1, 2],
        None,
        [[], {}, {}, {}],
        [{"a": 1}, {}, {}],
        [[], [], {}],
        "abc",
    ],
    ids=["two-items", "none", "four-items", "args-not-list", "kwargs-not-dict", "string"],
)
def test_body_that_is_not_args_kwargs_embed_raises_protocol_error(body):
    with pytest.raises(ProtocolError, match="proj.x"):
        decode_task({"task": "proj.x", "id": "id-10"}, {}, body)


def test_embed_that_is_not_a_mapping_raises_protocol_error():
    with pytest.raises(ProtocolError, match="proj.x"):
        decode_task({"task": "proj.x", "id": "id-11"}, {}, [[], {}, "oops"])


@pytest.mark.parametrize(
    "header, value, error",
    [
        ("eta", "next tuesday", "ISO 8601"),
        ("expires", "soon", "ISO 8601"),
        ("timelimit", 5, "timelimit"),
        ("retries", "many", "retries"),
    ],
    ids=["eta", "expires", "timelimit", "retries"],
)
def test_malformed_header_raises_protocol_error(header, value, error):
    headers = {"task": "proj.x", "id": "id-12", header: value}
    with pytest.raises(ProtocolError, match=error):
        decode_task(headers, {}, [[], {}, {}])


def test_decoded_queue_message_from_kombu_matches_built_message(kernel_app):
    """Through a real transport: what a worker decodes is what was built."""
    message = full_message()
    queue = Queue(f"protocol.{uuid.uuid4().hex}")
    with kernel_app.connection() as connection:
        connection.Producer().publish(
            message.body,
            routing_key=queue.name,
            declare=[queue],
            headers=message.headers,
            serializer="json",
            **message.properties,
        )
        received = queue(connection.default_channel).get(no_ack=True)
    decoded = decode_task(received.headers, received.properties, received.payload)
    assert (decoded.id, decoded.name, decoded.args, decoded.eta) == (
        "id-1",
        "proj.tasks.add",
        (2, 3),
        ETA,
    )
    assert decoded.reply_to == "replies"


def test_timelimit_header_is_hard_then_soft_as_celery_writes_it():
    celery = pytest.importorskip("celery")
    theirs = celery.Celery("peer", set_as_current=False).amqp.as_task_v2(
        "id-9", "proj.tasks.add", args=(), kwargs={}, time_limit=30.0, soft_time_limit=20.0
    )
    ours = build_task_message(
        task_id="id-9", name="proj.tasks.add", args=(), kwargs={}, time_limit=30.0,
        soft_time_limit=20.0,
    )  # fmt: skip
    assert ours.headers["timelimit"] == list(theirs.headers["timelimit"]) == [30.0, 20.0]
