"""Routing on RabbitMQ, with workers in the test process: direct, topic and fanout
exchanges, queues declared from the ``queues`` option, ``-Q`` selection, priorities,
dead-lettering, remote control, QoS and queues that already exist."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from amqp_harness import wait_until
from kombu import Exchange, Queue

from kernel import App
from kernel.exceptions import TaskRevokedError

pytestmark = pytest.mark.integration


def recorder(app: App) -> tuple[list[tuple[str, Any]], Any]:
    """A task ``routing.note(value)`` that records (worker hostname, value)."""
    seen: list[tuple[str, Any]] = []

    @app.task(name="routing.note", bind=True)
    def note(self, value):
        seen.append((self.request.hostname, value))
        return value

    return seen, note


def test_direct_routes_by_queue_and_workers_consume_only_their_queues(make_app, workers, broker):
    first, second = broker.name("first"), broker.name("second")
    app = make_app(task_routes={"routing.to_first": first, "routing.to_second": second})
    seen: list[str] = []

    @app.task(name="routing.to_first")
    def to_first():
        seen.append("first")

    @app.task(name="routing.to_second")
    def to_second():
        seen.append("second")

    workers(app, queues=[first])  # `kernel worker -Q <first>`
    to_first.delay().get(timeout=10)
    to_second.delay()
    assert seen == ["first"]
    assert broker.count(second) == 1  # waits for a worker of its own queue


def test_topic_exchange_routes_by_pattern_declared_from_the_queues_option(
    make_app, workers, broker
):
    media = broker.name("media")
    video, audio = broker.name("video"), broker.name("audio")
    app = make_app(
        options={
            "queues": [
                Queue(video, Exchange(media, "topic"), routing_key="media.video.#"),
                {
                    "name": audio,
                    "exchange": media,
                    "exchange_type": "topic",
                    "routing_key": "media.audio.#",
                },
            ]
        }
    )
    seen, note = recorder(app)
    workers(app, queues=[video], hostname="video@%h")
    workers(app, queues=[audio], hostname="audio@%h")
    route = {"exchange": media, "exchange_type": "topic", "declare": False}
    results = [
        note.apply_async(("hd",), routing_key="media.video.hd", queue=video, **route),
        note.apply_async(("mp3",), routing_key="media.audio.mp3", queue=audio, **route),
        note.apply_async(("4k",), routing_key="media.video.uhd.4k", queue=video, **route),
    ]
    assert [r.get(timeout=10) for r in results] == ["hd", "mp3", "4k"]
    assert sorted((host.split("@")[0], value) for host, value in seen) == [
        ("audio", "mp3"),
        ("video", "4k"),
        ("video", "hd"),
    ]
    # A delayed message to the topic exchange comes back through the same pattern.
    started = time.monotonic()
    later = note.apply_async(
        ("later",), routing_key="media.video.sd", queue=video, countdown=1, **route
    )
    assert later.get(timeout=10) == "later"
    assert time.monotonic() - started >= 1.0


def test_fanout_exchange_gives_every_bound_queue_a_copy(make_app, workers, broker):
    everyone = broker.name("everyone")
    queues = [broker.name("member") for _ in range(2)]
    app = make_app(
        options={"queues": [Queue(name, Exchange(everyone, "fanout")) for name in queues]}
    )
    seen, note = recorder(app)
    for n, queue in enumerate(queues):
        workers(app, queues=[queue], hostname=f"member{n}@%h")
    for queue in queues:  # both workers declared their queue, bound to the fanout
        wait_until(lambda queue=queue: broker.consumers(queue) == 1, 10, f"a consumer of {queue}")
    note.apply_async(
        ("to all",),
        exchange=everyone,
        exchange_type="fanout",
        routing_key="",
        queue=queues[0],
        declare=False,
    )
    wait_until(lambda: len(seen) == 2, 10, "both copies to run")
    time.sleep(0.3)  # no third copy follows
    assert sorted(host.split("@")[0] for host, _ in seen) == ["member0", "member1"]
    assert [value for _, value in seen] == ["to all", "to all"]
    # A fanout exchange cannot route through the delay exchanges: the message goes out
    # at once, and each worker holds its copy until it is due.
    started = time.monotonic()
    note.apply_async(
        ("later",),
        exchange=everyone,
        exchange_type="fanout",
        routing_key="",
        queue=queues[0],
        declare=False,
        countdown=1,
    )
    wait_until(lambda: len(seen) == 4, 10, "both delayed copies to run")
    assert time.monotonic() - started >= 1.0


def test_higher_priority_runs_first_on_a_classic_queue_with_max_priority(make_app, workers, broker):
    app = make_app(options={"max_priority": 10})
    seen, note = recorder(app)
    for priority in (1, 9, 5, 3, 7):
        note.apply_async((priority,), priority=priority)
    assert broker.count(app.conf.task_default_queue) == 5
    workers(app, pool="solo", concurrency=1, prefetch_multiplier=1)
    wait_until(lambda: len(seen) == 5, 10, "the five tasks")
    assert [value for _, value in seen] == [9, 7, 5, 3, 1]


def test_dead_letter_queue_receives_rejected_and_over_limit_messages(make_app, broker):
    dead = broker.name("dead")
    app = make_app(options={"queue_type": "quorum", "dead_letter_queue": dead, "delivery_limit": 1})
    queue = app.conf.task_default_queue
    rejected = app.send_task("routing.anything", ("rejected",), ignore_result=True)
    returned = app.send_task("routing.anything", ("returned",), ignore_result=True)
    with app.connection() as connection:
        bound = Queue(queue, Exchange(queue), routing_key=queue)(connection.default_channel)
        taken = {}

        def both_taken() -> bool:
            message = bound.get()
            if message is not None:
                taken[message.headers["id"]] = message
            return len(taken) == 2

        wait_until(both_taken, 10, "both messages to be taken", interval=0.01)
        taken[rejected.id].reject(requeue=False)  # e.g. a consumer that cannot read it
        taken[returned.id].reject(requeue=True)  # returned once: within x-delivery-limit 1
        again = wait_until(bound.get, 5, "the returned message")
        again.reject(requeue=True)  # returned twice: over the limit, dead-lettered
    wait_until(lambda: broker.count(dead) == 2, 10, "both messages in the dead-letter queue")
    ids = {message.properties["application_headers"]["id"] for message in broker.take(dead)}
    assert ids == {rejected.id, returned.id}
    assert broker.count(queue) == 0


def test_remote_control_broadcasts_reach_every_worker_and_revoke_stores_revoked(make_app, workers):
    app = make_app()
    seen, note = recorder(app)
    for n in range(2):
        workers(app, hostname=f"node{n}@%h")
    replies = app.control.ping(timeout=1.0)
    assert sorted(name.split("@")[0] for reply in replies for name in reply) == ["node0", "node1"]
    task_id = "revoked-before-it-was-sent"
    app.control.revoke(task_id)
    inspect = app.control.inspect(timeout=0.5)

    def both_know() -> bool:
        return sum(task_id in ids for ids in inspect.revoked().values()) == 2

    wait_until(both_know, 10, "both workers to record the revoke")
    result = note.apply_async(("never",), task_id=task_id)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)
    assert result.state == "REVOKED"  # sent by the worker to this client's reply queue
    assert seen == []


def test_existing_queue_with_other_arguments_is_used_as_it_is(make_app, workers, broker, caplog):
    app = make_app(options={"queue_type": "quorum", "max_priority": 5})
    queue = app.conf.task_default_queue
    channel = broker.channel()
    channel.queue_declare(queue, durable=True, auto_delete=False)  # created by someone else
    channel.close()
    seen, note = recorder(app)
    with caplog.at_level(logging.WARNING, logger="kernel_amqp.transport"):
        workers(app)
        assert note.delay("works").get(timeout=10) == "works"
    assert any("already exists with other arguments" in r.getMessage() for r in caplog.records)


def test_quorum_queues_get_per_consumer_prefetch_and_classic_ones_global(make_app, workers):
    quorum = make_app(options={"queue_type": "quorum"})
    classic = make_app()
    quorum_worker = workers(quorum)
    classic_worker = workers(classic)
    assert quorum_worker._consumer.channel._global_qos is False
    assert classic_worker._consumer.channel._global_qos is True
    for app in (quorum, classic):
        seen, note = recorder(app)
        assert note.delay(1).get(timeout=10) == 1
