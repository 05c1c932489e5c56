"""Faults on RabbitMQ: the broker restarted under load, refused publishes.

RabbitMQ is restarted with ``rabbitmqctl stop_app`` / ``start_app`` (the node's Erlang
VM stays up; every connection is closed, queues are recovered from disk). Workers
reconnect with back-off, publishers retry as ``task_publish_retry_policy`` says, and
rpc:// results wait in their durable reply queue.
"""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest
from amqp_harness import Cluster, RabbitMQ, report, wait_until
from kernel_amqp.transport import MessageRefused

pytestmark = pytest.mark.integration

#: Publishing rides out a restart: up to ~60 s of retries.
RESTART_PROOF_POLICY = {
    "max_retries": 120,
    "interval_start": 0.2,
    "interval_step": 0.2,
    "interval_max": 0.5,
}


@pytest.fixture(scope="module")
def rabbitmq() -> RabbitMQ:
    reason = RabbitMQ.unavailable()
    if reason:
        pytest.skip(f"cannot restart RabbitMQ here: {reason}")
    return RabbitMQ()


@pytest.mark.timeout(180)
def test_rabbitmq_restarted_under_load_loses_no_task_and_workers_resume(
    make_cluster, rabbitmq: RabbitMQ, request: pytest.FixtureRequest, caplog
):
    cluster: Cluster = make_cluster(
        options={"queue_type": "quorum"}, task_publish_retry_policy=RESTART_PROOF_POLICY
    )
    total, before, during = 300, 200, 100
    options = ["-P", "prefork", "-c", "2", "--prefetch-multiplier", "1"]
    workers = [cluster.worker(*options, wait=False) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    pids = [worker.proc.pid for worker in workers]
    app = cluster.app
    results = [app.send_task("amqp_tasks.count", (f"t{i}", 0.05)) for i in range(before)]
    # A second publisher keeps sending through the restart.
    late: list = []
    errors: list[BaseException] = []
    publisher_app = cluster.client()

    def publish_during_restart() -> None:
        try:
            for i in range(before, before + during):
                late.append(publisher_app.send_task("amqp_tasks.count", (f"t{i}", 0.05)))
                time.sleep(0.02)  # pacing, so that sends span the restart
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    wait_until(lambda: len(cluster.records.counts()) >= 60, 60, "60 runs")
    caplog.set_level(logging.WARNING, logger="kernel.app")
    publisher = threading.Thread(target=publish_during_restart)
    publisher.start()
    down_at = time.time()
    rabbitmq.stop_app()
    stopped_at = time.time()
    rabbitmq.start_app()
    back_at = time.time()
    publisher.join(90)
    assert not publisher.is_alive() and errors == []
    run_when_back = len(cluster.records.counts())

    def explain() -> str:
        missing = sorted(
            {f"t{i}" for i in range(total)} - set(cluster.records.counts()),
            key=lambda t: int(t[1:]),
        )
        return f"{len(missing)} of {total} never ran: {missing[:20]}\n{cluster.logs()}"

    def all_run() -> bool:
        for worker in workers:
            assert worker.alive, f"worker {worker.name} died after the restart:\n{worker.tail()}"
        return len(cluster.records.counts()) >= total

    wait_until(all_run, 60, f"all {total} tasks to run", interval=0.2, explain=explain)
    everything = results + late
    assert [r.get(timeout=60) for r in everything] == [f"t{i}" for i in range(total)]
    # The same workers consume new messages: nobody restarted them.
    assert app.send_task("amqp_tasks.add", (2, 2)).get(timeout=30) == 4
    assert [w.proc.pid for w in workers] == pids and all(w.alive for w in workers)
    wait_until(lambda: cluster.broker.count(cluster.queue) == 0, 30, "the queue to empty")
    counts = cluster.records.counts()
    assert set(counts) == {f"t{i}" for i in range(total)}
    twice = sorted(token for token, count in counts.items() if count > 1)
    first_run: dict[str, float] = {}
    for event in cluster.records.events("run"):
        first_run.setdefault(event.token, event.at)
    ended_before_stop = {
        event.token for event in cluster.records.events("end") if event.at < down_at
    }
    # At least once: a task may run again only if it was running when the broker went
    # away (its ack was lost), or if its send was retried: a publish whose confirm was
    # lost with the connection is sent again, and both copies may exist. "Running"
    # means: started before the broker was back, and not finished before it was
    # stopped (a task that ended before down_at was acknowledged on a live connection).
    in_flight = {token for token, at in first_run.items() if at < back_at} - ended_before_stop
    retried_ids = {
        match
        for record in caplog.records
        if record.name == "kernel.app" and "could not send task" in record.getMessage()
        for match in re.findall(r"\[([0-9a-f-]{36})\]", record.getMessage())
    }
    tokens = {result.id: f"t{i}" for i, result in enumerate(everything)}
    resent = {tokens[task_id] for task_id in retried_ids if task_id in tokens}
    assert not set(twice) - in_flight - resent, "tasks neither running nor sent then ran twice"
    cluster.broker.track(queue=publisher_app.backend.reply_queue_name)
    publisher_app.close()
    report(
        request.config,
        f"amqp restart (stop_app {stopped_at - down_at:.1f}s + start_app "
        f"{back_at - stopped_at:.1f}s) under load: {run_when_back}/{total} tasks had run "
        "when it was back; "
        f"{len(twice)} ran twice: {twice or 'none'} ({len(resent)} sends were retried)",
    )


def test_delay_returns_only_once_the_broker_has_the_message(make_cluster, broker):
    """With publisher confirms (the default), a message the broker refuses raises in
    ``delay()`` instead of vanishing; one it accepted is in the queue when it returns."""
    queue = broker.name("bounded")
    cluster = make_cluster(
        options={"queue_arguments": {queue: {"x-max-length": 2, "x-overflow": "reject-publish"}}}
    )
    app = cluster.app
    for n in range(2):
        app.send_task("amqp_tasks.add", (n, n), queue=queue, ignore_result=True)
        assert broker.count(queue) == n + 1  # no wait: the broker confirmed it
    with pytest.raises(MessageRefused, match="refused the message"):
        app.send_task("amqp_tasks.add", (2, 2), queue=queue, ignore_result=True)
    assert broker.count(queue) == 2
