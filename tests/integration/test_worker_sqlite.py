"""End to end on the embedded default: `kernel worker` processes and the SQLite broker."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from kombu import Connection, Queue

from kernel.exceptions import NotRegistered, WorkerLostError

from .conftest import Broker, wait_until

pytestmark = pytest.mark.integration


def test_prefork_worker_returns_results_and_failures_with_tracebacks(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2")
    added = broker.app.send_task("itasks.add", (2, 3))
    failed = broker.app.send_task("itasks.fail", ("kaput",))
    assert added.get(timeout=20) == 5
    with pytest.raises(ValueError, match="kaput"):
        failed.get(timeout=20)
    assert failed.state == "FAILURE"
    assert "raise ValueError(message)" in failed.traceback
    assert added.date_done is not None


def test_custom_progress_state_is_visible_while_the_task_runs(broker: Broker):
    broker.worker("-P", "threads", "-c", "2")
    result = broker.app.send_task("itasks.progress", (40, 0.05))
    info = wait_until(lambda: result.state == "PROGRESS" and result.info, 20, "a PROGRESS state")
    assert info["total"] == 40
    assert result.get(timeout=20) == 40


def test_unknown_task_fails_with_not_registered_and_worker_keeps_going(broker: Broker):
    worker = broker.worker("-P", "solo")
    unknown = broker.app.send_task("itasks.does_not_exist", (1,))
    with pytest.raises(NotRegistered, match="does_not_exist"):
        unknown.get(timeout=20)
    assert broker.app.send_task("itasks.add", (1, 1)).get(timeout=20) == 2
    assert "is not registered" in worker.log()


def test_malformed_messages_are_dead_lettered_and_the_worker_keeps_going(broker: Broker):
    worker = broker.worker("-P", "solo")
    queue = Queue("celery")
    with Connection(
        broker.url, transport=broker.app.plugins.transport_for_url(broker.url).load()
    ) as connection:
        producer = connection.Producer()
        producer.publish({"not": "a task"}, routing_key="celery", declare=[queue])
        producer.publish(
            [1, 2],
            routing_key="celery",
            headers={"task": "itasks.add", "id": "x1"},
            declare=[queue],
        )
        producer.publish(
            b"\x00not json",
            routing_key="celery",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": "itasks.add", "id": "x2"},
            declare=[queue],
        )
        producer.publish(
            b"pickled?",
            routing_key="celery",
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": "itasks.add", "id": "x3"},
            declare=[queue],
        )
    assert broker.app.send_task("itasks.add", (20, 22)).get(timeout=20) == 42
    log = wait_until(
        lambda: worker.log().count("rejected message") >= 4 and worker.log(),
        20,
        "four rejection log lines",
    )
    assert "not a protocol v2 task" in log
    assert "not accepted" in log
    with Connection(
        broker.url, transport=broker.app.plugins.transport_for_url(broker.url).load()
    ) as connection:
        dead = connection.SimpleQueue(broker.app.conf.task_dead_letter_queue)
        assert dead.qsize() == 4
        dead.close()
    assert broker.app.AsyncResult("x3").state == "FAILURE"  # the client is told why


def test_many_tasks_from_several_producers_are_each_run_exactly_once(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2")
    broker.worker("-P", "threads", "-c", "4")
    producers, per_producer = 3, 150
    script = textwrap.dedent(f"""
        import sys
        from kernel import App
        app = App("producer", broker={broker.url!r}, backend={broker.url!r})
        for i in range({per_producer}):
            app.send_task("itasks.record", (f"{{sys.argv[1]}}-{{i}}",))
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, f"p{n}"], env=broker.env)
        for n in range(producers)
    ]
    for proc in procs:
        assert proc.wait(60) == 0
    total = producers * per_producer
    wait_until(lambda: len(broker.records()) >= total, 90, f"{total} executions")
    tokens = Counter(line.split()[1] for line in broker.records())
    expected = {f"p{n}-{i}" for n in range(producers) for i in range(per_producer)}
    assert set(tokens) == expected
    duplicates = {token: count for token, count in tokens.items() if count > 1}
    assert not duplicates


def test_worker_killed_mid_task_has_its_task_rerun_by_a_new_worker(broker: Broker):
    first = broker.worker("-P", "solo", visibility_timeout=2)
    result = broker.app.send_task("itasks.slow_record", ("crash", 2.0))
    wait_until(
        lambda: any(r.startswith("start crash") for r in broker.records()), 20, "the task to start"
    )
    first.kill_group()
    broker.worker("-P", "solo", visibility_timeout=2)
    assert result.get(timeout=30) == "crash"
    starts = [r for r in broker.records() if r.startswith("start crash")]
    ends = [r for r in broker.records() if r.startswith("end crash")]
    assert len(starts) == 2 and len(ends) == 1


def test_long_task_is_not_handed_to_a_second_worker_while_its_worker_lives(broker: Broker):
    broker.worker("-P", "solo", visibility_timeout=1)
    broker.worker("-P", "solo", visibility_timeout=1)
    result = broker.app.send_task("itasks.slow_record", ("long", 3.5))
    assert result.get(timeout=30) == "long"
    assert len([r for r in broker.records() if r.startswith("start long")]) == 1


def test_warm_shutdown_finishes_running_tasks_and_returns_reserved_ones(broker: Broker):
    worker = broker.worker("-P", "solo", "--prefetch-multiplier", "4")
    results = [broker.app.send_task("itasks.slow_record", (f"t{i}", 1.0)) for i in range(3)]
    wait_until(
        lambda: any(r.startswith("start t") for r in broker.records()),
        20,
        "the first task to start",
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(30) == 0
    finished_by_first = {r.split()[1] for r in broker.records() if r.startswith("end")}
    started_by_first = {r.split()[1] for r in broker.records() if r.startswith("start")}
    assert finished_by_first == started_by_first and len(finished_by_first) == 1
    assert "warm shutdown" in worker.log()
    broker.worker("-P", "threads", "-c", "3")
    assert sorted(r.get(timeout=30) for r in results) == ["t0", "t1", "t2"]
    ends = Counter(r.split()[1] for r in broker.records() if r.startswith("end"))
    assert ends == {"t0": 1, "t1": 1, "t2": 1}


def test_task_whose_process_keeps_dying_is_dead_lettered_after_max_deliveries(broker: Broker):
    worker = broker.worker("-P", "prefork", "-c", "1")
    result = broker.app.send_task("itasks.die")
    with pytest.raises(WorkerLostError, match="delivered 3 times"):
        result.get(timeout=60)
    assert len([r for r in broker.records() if r.startswith("die")]) == 3
    assert "Traceback" not in str(result.result)  # one clear line, not billiard's traceback
    assert broker.app.send_task("itasks.add", (1, 2)).get(timeout=20) == 3
    assert "returning it to the queue" in worker.log()


def test_broken_plugin_is_reported_once_and_the_worker_still_runs_tasks(broker: Broker):
    worker = broker.worker("-P", "solo", plugins=("broken_plugin",))
    assert broker.app.send_task("itasks.add", (3, 4)).get(timeout=20) == 7
    log = worker.log()
    assert log.count("plugin 'broken_plugin'") == 1
    assert "broken on purpose" in log


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_cold_shutdown_returns_the_running_task_which_a_new_worker_finishes(
    broker: Broker, pool: str
):
    worker = broker.worker("-P", pool, "-c", "1")
    result = broker.app.send_task("itasks.slow_record", ("cold", 3.0))
    wait_until(
        lambda: any(r.startswith("start cold") for r in broker.records()), 20, "the task to start"
    )
    worker.signal(signal.SIGTERM)
    wait_until(lambda: "warm shutdown" in worker.log(), 10, "the warm shutdown to begin")
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(20) == 0
    assert "cold shutdown" in worker.log()
    assert not [r for r in broker.records() if r.startswith("end cold")]
    broker.worker("-P", "solo")
    assert result.get(timeout=30) == "cold"
    assert len([r for r in broker.records() if r.startswith("end cold")]) == 1


def test_reject_on_worker_lost_false_marks_the_task_failed_at_once(broker: Broker):
    broker.worker("-P", "prefork", "-c", "1")
    result = broker.app.send_task("itasks.die_without_requeue")
    with pytest.raises(WorkerLostError, match="the process running it died"):
        result.get(timeout=30)
    assert len([r for r in broker.records() if r.startswith("die-once")]) == 1


def test_cold_shutdown_of_a_threads_worker_waits_instead_of_running_the_task_twice(
    broker: Broker,
):
    worker = broker.worker("-P", "threads", "-c", "2")
    result = broker.app.send_task("itasks.slow_record", ("threaded", 2.0))
    wait_until(
        lambda: any(r.startswith("start threaded") for r in broker.records()),
        20,
        "the task to start",
    )
    worker.signal(signal.SIGTERM)
    wait_until(lambda: "warm shutdown" in worker.log(), 10, "the warm shutdown to begin")
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(30) == 0
    assert "cannot stop running tasks" in worker.log()
    assert result.get(timeout=10) == "threaded"
    broker.worker("-P", "solo")  # nothing was handed back, so nothing runs again
    assert broker.app.send_task("itasks.add", (1, 1)).get(timeout=20) == 2
    assert len([r for r in broker.records() if r.startswith("start threaded")]) == 1


def test_task_raising_system_exit_stops_solo_workers_a_bounded_number_of_times(broker: Broker):
    result = broker.app.send_task("itasks.exit_process")
    for _ in range(3):
        worker = broker.worker("-P", "solo")
        worker.wait_exit(30)
        assert "its worker stopped" in worker.log()
    broker.worker("-P", "solo")
    with pytest.raises(WorkerLostError, match="delivered 3 times"):
        result.get(timeout=30)
    assert len([r for r in broker.records() if r.startswith("exit")]) == 3
