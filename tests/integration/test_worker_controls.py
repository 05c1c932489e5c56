"""Worker controls end to end: time limits, rate limits, revocation, child recycling,
autoscale and the shutdown phases, on real ``kernel worker`` processes (SQLite broker)."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections import Counter

import pytest

from kernel.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from .conftest import Broker, wait_until

pytestmark = pytest.mark.integration

APP = "limits_tasks"


def send(broker: Broker, name: str, *args, **options):
    return broker.app.send_task(f"{APP}.{name}", args, **options)


def lines(broker: Broker, kind: str, token: str | None = None) -> list[list[str]]:
    """Record lines ``kind token ...`` split into fields."""
    found = [r.split() for r in broker.records() if r.startswith(kind + " ")]
    return [f for f in found if token is None or f[1] == token]


def started(broker: Broker, token: str) -> bool:
    return bool(lines(broker, "start", token))


def leased(broker: Broker) -> int:
    """Messages delivered to a worker and not yet acknowledged."""
    path = broker.url.removeprefix("sqlite:///")
    with sqlite3.connect(path, timeout=30) as db:
        query = (
            "SELECT COUNT(*) FROM kernel_messages WHERE queue = 'celery' "
            "AND lease_owner IS NOT NULL"
        )
        return db.execute(query).fetchone()[0]


# ---------------------------------------------------------------------------- time limits


def test_soft_time_limit_lets_the_task_clean_up_on_prefork(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", "--soft-time-limit", "1", app=APP)
    caught = send(broker, "sleeper", "caught", 10)
    uncaught = send(broker, "soft_limited", "uncaught", 10)
    assert caught.get(timeout=20) == "cleaned up"
    with pytest.raises(SoftTimeLimitExceeded):
        uncaught.get(timeout=20)
    assert uncaught.state == "FAILURE"
    assert not lines(broker, "end")


def test_hard_time_limit_kills_the_child_fails_the_task_once_and_replaces_the_child(
    broker: Broker,
):
    worker = broker.worker("-P", "prefork", "-c", "1", app=APP)
    result = send(broker, "hard_limited", "hard", 10)
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=20)
    assert result.state == "FAILURE"
    (start,) = lines(broker, "start", "hard")  # failed, not re-run
    assert send(broker, "pid", "after").get(timeout=20) != int(start[2])
    assert "hard time limit (1s) exceeded" in worker.log()


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_soft_time_limit_on_pools_without_processes(broker: Broker, pool: str):
    worker = broker.worker("-P", pool, "-c", "2", "--time-limit", "30", app=APP)
    assert send(broker, "sleeper", "soft", 10, soft_time_limit=1).get(timeout=20) == "cleaned up"
    assert f"pool {pool} does not enforce hard time limits" in worker.log()


def test_time_limit_from_the_message_header_beats_the_workers_default(broker: Broker):
    broker.worker("-P", "prefork", "-c", "1", "--soft-time-limit", "30", app=APP)
    # apply_async(soft_time_limit=...) travels in the message's timelimit header
    assert send(broker, "sleeper", "hdr", 10, soft_time_limit=1).get(timeout=20) == "cleaned up"


# ---------------------------------------------------------------------------- rate limits


def test_rate_limited_type_is_held_to_its_rate_while_other_types_flow(broker: Broker):
    broker.worker("-P", "threads", "-c", "4", app=APP)
    limited = [send(broker, "limited", f"l{i}") for i in range(30)]
    unlimited = [send(broker, "unlimited", f"u{i}") for i in range(30)]
    for result in unlimited + limited:
        result.get(timeout=30)
    limited_at = sorted(float(f[2]) for f in lines(broker, "limited"))
    unlimited_at = sorted(float(f[2]) for f in lines(broker, "unlimited"))
    # 10/s with a burst of 10: 30 tasks need at least ~2 s
    assert limited_at[-1] - limited_at[0] >= 1.8
    for i, start in enumerate(limited_at):  # no window runs more than the bucket allows
        in_window = sum(1 for t in limited_at[i:] if t - start < 1.0)
        assert in_window <= 10 + 10 + 1
    # the other type was not stuck behind the limited one
    assert unlimited_at[-1] < limited_at[-1] - 0.5


def test_rate_limit_changed_at_run_time_by_remote_control(broker: Broker):
    broker.worker("-P", "threads", "-c", "4", app=APP)
    assert send(broker, "unlimited", "warmup").get(timeout=20) == "warmup"
    replies = broker.app.control.rate_limit(f"{APP}.unlimited", "2/s", reply=True, timeout=5)
    assert replies and "ok" in next(iter(replies[0].values()))
    results = [send(broker, "unlimited", f"r{i}") for i in range(6)]
    for result in results:
        result.get(timeout=30)
    times = sorted(float(f[2]) for f in lines(broker, "unlimited") if f[1].startswith("r"))
    assert times[-1] - times[0] >= 1.5  # burst of 2, then 2/s: 4 more need ~2 s


# ---------------------------------------------------------------------------- revocation


def test_revoked_task_that_has_not_started_never_runs(broker: Broker):
    broker.worker("-P", "prefork", "-c", "1", app=APP)
    blocker = send(broker, "sleeper", "blocker", 2)
    wait_until(lambda: started(broker, "blocker"), 20, "the blocking task to start")
    victim = send(broker, "sleeper", "victim", 0)
    victim.revoke()
    assert blocker.get(timeout=20) == "finished"
    wait_until(lambda: victim.state == "REVOKED", 20, "the revoked task to be marked REVOKED")
    assert send(broker, "pid", "after").get(timeout=20)
    assert not started(broker, "victim")


@pytest.mark.parametrize("plain_revoke_first", [False, True])
def test_revoke_with_terminate_of_a_task_queued_in_the_pool_spares_the_running_one(
    broker: Broker, plain_revoke_first: bool
):
    """A prefork pool queues one job per child ahead; terminating the queued one must
    neither run it nor signal the child busy with another task."""
    worker = broker.worker("-P", "prefork", "-c", "1", app=APP)
    blocker = send(broker, "sleeper", "blocker", 2)
    wait_until(lambda: started(broker, "blocker"), 20, "the blocking task to start")
    victim = send(broker, "sleeper", "victim", 0)
    wait_until(lambda: leased(broker) == 2, 20, "the worker to receive the victim")
    if plain_revoke_first:
        victim.revoke()  # keeps it from starting
    victim.revoke(terminate=True, signal="SIGKILL")  # must not hit the blocker's child
    assert blocker.get(timeout=20) == "finished"
    wait_until(lambda: victim.state == "REVOKED", 20, "the revoked task to be marked REVOKED")
    assert not started(broker, "victim")
    assert "it is not run unless it already began" in worker.log() or not plain_revoke_first


def test_early_acknowledged_task_waits_for_a_free_child_and_survives_a_warm_shutdown(
    broker: Broker,
):
    """acks_late=False is acknowledged when handed to the pool, so it is never queued
    ahead of a busy child: held unacknowledged, a warm shutdown hands it back."""
    worker = broker.worker("-P", "prefork", "-c", "1", app=APP)
    send(broker, "sleeper", "blocker", 1.5)
    wait_until(lambda: started(broker, "blocker"), 20, "the blocking task to start")
    early = send(broker, "early_ack", "early")
    wait_until(lambda: leased(broker) == 2, 20, "the worker to receive it (unacknowledged)")
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(30) == 0
    assert not started(broker, "early")
    broker.worker("-P", "prefork", "-c", "1", app=APP)
    assert early.get(timeout=20) == "early"
    assert len(lines(broker, "start", "early")) == 1


def test_warm_shutdown_of_prefork_returns_jobs_queued_in_the_pool_unstarted(broker: Broker):
    worker = broker.worker("-P", "prefork", "-c", "1", app=APP)
    first = send(broker, "sleeper", "first", 1.5)
    wait_until(lambda: started(broker, "first"), 20, "the first task to start")
    queued = [send(broker, "sleeper", f"q{i}", 0) for i in range(3)]
    # held by the worker: first running, q0 waiting in the pool, q1 (and q2) reserved
    wait_until(
        lambda: leased(broker) >= 3,
        20,
        "the worker to receive the queued tasks",
        explain=lambda: f"{leased(broker)} held",
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(30) == 0
    assert first.get(timeout=5) == "finished"
    assert not any(started(broker, f"q{i}") for i in range(3))
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    assert [r.get(timeout=30) for r in queued] == ["finished"] * 3
    starts = Counter(f[1] for f in lines(broker, "start"))
    assert starts == {"first": 1, "q0": 1, "q1": 1, "q2": 1}


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_revoke_with_terminate_stops_a_running_task(broker: Broker, pool: str):
    broker.worker("-P", pool, "-c", "2", app=APP)
    result = send(broker, "sleeper", "running", 30)
    wait_until(lambda: started(broker, "running"), 20, "the task to start")
    result.revoke(terminate=True, signal="SIGKILL" if pool == "prefork" else "SIGTERM")
    wait_until(lambda: result.state == "REVOKED", 20, "the terminated task to be REVOKED")
    assert send(broker, "pid", "after").get(timeout=20)  # the worker goes on
    assert not lines(broker, "end", "running")
    assert len(lines(broker, "start", "running")) == 1  # not re-run


def test_revoked_ids_survive_a_restart_with_statedb(broker: Broker, tmp_path):
    statedb = str(tmp_path / "worker.state")
    worker = broker.worker("-P", "solo", "--statedb", statedb, app=APP)
    task_id = "revoked-before-it-was-sent"
    broker.app.control.revoke(task_id)
    # the broadcast reached the worker: it answers a ping sent after the revoke
    assert broker.app.control.ping(timeout=5)
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(30) == 0
    broker.worker("-P", "solo", "--statedb", statedb, app=APP)
    result = send(broker, "sleeper", "late", 0, task_id=task_id)
    wait_until(lambda: result.state == "REVOKED", 20, "the task to be REVOKED")
    assert not started(broker, "late")


# ---------------------------------------------------------------------------- recycling


def test_max_tasks_per_child_replaces_children(broker: Broker):
    broker.worker("-P", "prefork", "-c", "1", "--max-tasks-per-child", "2", app=APP)
    pids = [send(broker, "pid", f"p{i}").get(timeout=20) for i in range(6)]
    assert Counter(Counter(pids).values()) == {2: 3}  # three children, two tasks each


def test_max_memory_per_child_replaces_a_child_that_grew(broker: Broker):
    broker.worker("-P", "prefork", "-c", "1", "--max-memory-per-child", "250000", app=APP)
    first = send(broker, "pid", "before").get(timeout=20)
    assert send(broker, "grow_memory", 300_000).get(timeout=20) == first
    after = [send(broker, "pid", f"a{i}").get(timeout=20) for i in range(2)]
    assert after[0] != first and after[0] == after[1]


# ---------------------------------------------------------------------------- autoscale


def test_autoscale_grows_under_load_and_shrinks_when_idle(broker: Broker):
    broker.env["KERNEL_WORKER_AUTOSCALE_KEEPALIVE"] = "1"
    worker = broker.worker("-P", "prefork", "--autoscale", "4,1", app=APP)
    results = [send(broker, "sleeper", f"s{i}", 2) for i in range(4)]
    for result in results:
        assert result.get(timeout=30) == "finished"
    starts = sorted(float(f[3]) for f in lines(broker, "start"))
    assert starts[-1] - starts[0] < 1.9  # all four ran at the same time
    assert len({f[2] for f in lines(broker, "start")}) == 4
    wait_until(lambda: "now 1" in worker.log(), 20, "the pool to shrink back to 1")
    assert "autoscale: 3 more slot(s), now 4" in worker.log() or "now 4" in worker.log()


# ---------------------------------------------------------------------------- shutdown


def test_soft_shutdown_gives_running_tasks_time_then_requeues_them(broker: Broker):
    broker.env["KERNEL_WORKER_SOFT_SHUTDOWN_TIMEOUT"] = "1.5"
    worker = broker.worker("-P", "prefork", "-c", "2", app=APP)
    short = send(broker, "sleeper", "short", 0.5)
    send(broker, "sleeper", "long", 30)
    wait_until(
        lambda: started(broker, "short") and started(broker, "long"), 20, "both tasks to start"
    )
    began = time.monotonic()
    worker.signal(signal.SIGQUIT)
    assert worker.wait_exit(30) == 0
    assert time.monotonic() - began >= 1.0  # it waited for the soft period
    assert "soft shutdown" in worker.log()
    assert short.get(timeout=10) == "finished"
    assert not lines(broker, "end", "long")
    broker.env.pop("KERNEL_WORKER_SOFT_SHUTDOWN_TIMEOUT")
    second = broker.worker("-P", "prefork", "-c", "1", app=APP)
    wait_until(lambda: len(lines(broker, "start", "long")) == 2, 20, "the long task to rerun")
    second.kill_group()  # done: a warm stop would wait for the 30 s task


def test_sigterm_remapped_to_sigquit_is_a_cold_shutdown(broker: Broker):
    broker.env["REMAP_SIGTERM"] = "SIGQUIT"
    worker = broker.worker("-P", "prefork", "-c", "1", app=APP)
    send(broker, "sleeper", "remap", 30)
    wait_until(lambda: started(broker, "remap"), 20, "the task to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(20) == 0
    assert "cold shutdown" in worker.log()
    broker.env.pop("REMAP_SIGTERM")
    second = broker.worker("-P", "prefork", "-c", "1", app=APP)
    wait_until(lambda: len(lines(broker, "start", "remap")) == 2, 20, "the task to run again")
    second.kill_group()  # done: a warm stop would wait for the 30 s task
