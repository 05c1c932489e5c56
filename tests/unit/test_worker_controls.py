"""The worker's controls as units: rate parsing and buckets, autoscale decisions,
signals and shutdown phases, time-limit resolution, in-process revocation."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from kernel import states
from kernel.exceptions import ConfigurationError
from kernel.protocol import DecodedTask
from kernel.testing.pytest_plugin import start_worker, stop_worker
from kernel.worker.autoscale import Autoscaler, parse_autoscale
from kernel.worker.ratelimit import RateLimiter, parse_rate
from kernel.worker.worker import Worker, _signal_number

TIMEOUT = 5.0

# ---------------------------------------------------------------------------- rates


@pytest.mark.parametrize(
    ("rate", "per_second"),
    [("10/s", 10.0), ("120/m", 2.0), ("3600/h", 1.0), ("2.5", 2.5), (4, 4.0), ("5 / m", 5 / 60)],
)
def test_rates_are_read_in_tasks_per_second(rate, per_second):
    assert parse_rate(rate) == pytest.approx(per_second)


@pytest.mark.parametrize("rate", [None, "", 0, "0/s"])
def test_empty_or_zero_rate_means_no_limit(rate):
    assert parse_rate(rate) is None


@pytest.mark.parametrize("rate", ["ten per second", "10/d", "-1", "/s"])
def test_bad_rates_say_how_to_write_one(rate):
    with pytest.raises(ValueError, match="'10/s'"):
        parse_rate(rate)


def test_bucket_allows_a_burst_then_holds_the_rest_in_order():
    limiter = RateLimiter()
    limiter.configure("t", "5/s")
    admitted = [n for n in range(8) if limiter.admit("t", n)]
    assert admitted == [0, 1, 2, 3, 4]  # one second's worth at once
    assert len(limiter) == 3
    assert 0 < limiter.next_release() <= 0.2 + 1e-6
    assert limiter.release(10) == []  # no token yet
    time.sleep(0.25)
    assert limiter.release(10) == [5]  # one token arrived, oldest first
    assert limiter.remove(lambda item: item == 7) == [7]
    assert limiter.drain() == [6]


def test_waiting_type_keeps_its_order_and_other_types_are_not_held():
    limiter = RateLimiter()
    limiter.configure("slow", "1/h")
    assert limiter.admit("slow", "a")
    assert not limiter.admit("slow", "b")
    assert limiter.admit("fast", "x")  # no limit configured
    limiter.configure("slow", None)  # removing the limit releases what waits
    assert limiter.release(1) == ["b"]


def test_release_never_hands_out_more_than_the_free_slots():
    limiter = RateLimiter()
    limiter.configure("t", "1/h")
    limiter.admit("t", 0)
    for n in range(1, 4):
        limiter.admit("t", n)
    limiter.configure("t", "1000/s")
    assert limiter.release(2) == [1, 2]


# ---------------------------------------------------------------------------- autoscale


@pytest.mark.parametrize(
    ("value", "expected"), [("10,3", (10, 3)), ("4", (4, 0)), ((6, 2), (6, 2)), (None, None)]
)
def test_autoscale_is_max_comma_min(value, expected):
    assert parse_autoscale(value) == expected


@pytest.mark.parametrize("value", ["3,10", "0,0", "a,b", "1,2,3", "-1"])
def test_bad_autoscale_values_show_an_example(value):
    with pytest.raises(ValueError, match="--autoscale 10,3"):
        parse_autoscale(value)


class FakePool:
    def __init__(self, limit):
        self.limit = limit

    def grow(self, n):
        self.limit += n
        return n

    def shrink(self, n):
        self.limit -= n
        return n


class FakeWorker:
    def __init__(self, limit):
        self.pool = FakePool(limit)
        self.resized = 0

    def pool_resized(self):
        self.resized += 1


def test_autoscaler_grows_to_the_waiting_work_within_max_and_shrinks_after_keepalive():
    worker = FakeWorker(1)
    scaler = Autoscaler(worker, 4, 1, keepalive=0.2)
    scaler.interval = 0
    scaler.maybe_scale(waiting=10, running=1)
    assert worker.pool.limit == 4  # capped at max
    scaler.maybe_scale(waiting=0, running=1)
    assert worker.pool.limit == 4  # not before the keepalive
    time.sleep(0.25)
    scaler.maybe_scale(waiting=0, running=1)
    assert worker.pool.limit == 1
    assert worker.resized == 2


# ---------------------------------------------------------------------------- signals


@pytest.mark.parametrize(
    ("value", "number"),
    [(None, signal.SIGTERM), ("SIGKILL", signal.SIGKILL), ("kill", signal.SIGKILL), (15, 15)],
)
def test_signal_names_and_numbers(value, number):
    assert _signal_number(value) == number


def test_unknown_signal_says_what_to_use():
    with pytest.raises(ValueError, match="SIGTERM or SIGKILL"):
        _signal_number("SIGNOPE")


@pytest.fixture
def idle_worker(kernel_app):
    return Worker(kernel_app, pool="solo", install_signal_handlers=False)


def test_shutdown_phases_without_soft_shutdown(idle_worker, monkeypatch):
    monkeypatch.delenv("REMAP_SIGTERM", raising=False)
    assert idle_worker._next_phase(signal.SIGTERM) == "warm"
    assert idle_worker._next_phase(signal.SIGQUIT) == "cold"
    idle_worker.stop(phase="warm")
    assert idle_worker._next_phase(signal.SIGINT) == "cold"


def test_shutdown_phases_with_soft_shutdown(idle_worker, monkeypatch):
    monkeypatch.delenv("REMAP_SIGTERM", raising=False)
    idle_worker.app.conf.worker_soft_shutdown_timeout = 5
    assert idle_worker._next_phase(signal.SIGQUIT) == "soft"
    idle_worker.stop(phase="warm")
    assert idle_worker._next_phase(signal.SIGTERM) == "soft"
    idle_worker.stop(phase="soft")
    assert idle_worker._next_phase(signal.SIGTERM) == "cold"
    idle_worker.stop(phase="warm")  # never goes back to a milder phase
    assert idle_worker._stop_mode == "soft"


def test_remap_sigterm_makes_sigterm_act_as_sigquit(idle_worker, monkeypatch):
    monkeypatch.setenv("REMAP_SIGTERM", "SIGQUIT")
    assert idle_worker._next_phase(signal.SIGTERM) == "cold"


def test_autoscale_on_a_pool_that_cannot_is_refused(kernel_app):
    with pytest.raises(ConfigurationError, match="cannot autoscale"):
        Worker(kernel_app, pool="solo", autoscale="4,1", install_signal_handlers=False)


def test_autoscale_starts_at_its_minimum(kernel_app):
    worker = Worker(kernel_app, pool="threads", autoscale="8,2", install_signal_handlers=False)
    assert worker.concurrency == 2


def test_bad_rate_limit_on_a_task_fails_at_worker_start(kernel_app):
    @kernel_app.task(rate_limit="fast")
    def limited():
        return None

    with pytest.raises(ConfigurationError, match="limited"):
        Worker(kernel_app, pool="solo", install_signal_handlers=False)


# ---------------------------------------------------------------------------- time limits


def test_time_limits_come_from_the_message_then_the_task_then_the_worker(kernel_app):
    @kernel_app.task(soft_time_limit=5)
    def own():
        return None

    kernel_app.conf.update(task_soft_time_limit=7, task_time_limit=9)
    worker = Worker(kernel_app, pool="solo", install_signal_handlers=False)

    def decoded(limits):
        return DecodedTask(
            id="x", name=own.name, args=(), kwargs={}, embed={}, headers={}, eta=None,
            expires=None, retries=0, time_limits=limits, root_id=None, parent_id=None,
            group_id=None, origin=None, reply_to=None, ignore_result=False, delivery_count=0,
        )  # fmt: skip

    assert worker._time_limits(own, decoded((None, None))) == (5, 9)
    assert worker._time_limits(own, decoded((2, 1))) == (1, 2)  # header: hard, soft


# ---------------------------------------------------------------------------- revocation


def test_revoked_waiting_tasks_are_dropped_and_marked_revoked(kernel_app):
    release = threading.Event()

    @kernel_app.task
    def block():
        release.wait(TIMEOUT)
        return "done"

    @kernel_app.task
    def victim():
        return "ran"

    worker, thread = start_worker(kernel_app, pool="threads", concurrency=1)
    try:
        first = block.delay()
        queued = victim.delay()
        kernel_app.control.revoke(queued.id)  # a broadcast, as from another process
        deadline = time.monotonic() + TIMEOUT
        while queued.state != states.REVOKED and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queued.state == states.REVOKED
        assert queued.id in worker.revoked
        release.set()
        assert first.get(timeout=TIMEOUT) == "done"
        assert worker.counts["revoked"] == 1
    finally:
        release.set()
        stop_worker(worker, thread)


# ---------------------------------------------------------------------------- eager states


def test_eager_reject_and_ignore_have_readable_states(kernel_app):
    from kernel.exceptions import Ignore, Reject

    @kernel_app.task
    def rejects():
        raise Reject("no", requeue=False)

    @kernel_app.task
    def ignores():
        raise Ignore()

    assert rejects.apply().state == states.REJECTED
    assert ignores.apply().state == states.IGNORED


def test_rate_limited_task_that_expires_while_waiting_is_revoked_not_run(kernel_app):
    ran = []

    @kernel_app.task(rate_limit="1/h")
    def slow(token):
        ran.append(token)
        return token

    worker, thread = start_worker(kernel_app, pool="threads", concurrency=2)
    try:
        assert slow.delay(1).get(timeout=TIMEOUT) == 1  # takes the only token
        waiting = slow.apply_async((2,), expires=0.3)
        deadline = time.monotonic() + TIMEOUT
        while not len(worker.rate_limits) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(worker.rate_limits) == 1, "the second task should wait for a token"
        time.sleep(0.4)  # let it expire while it waits
        kernel_app.control.rate_limit(slow.name, None)  # lift the limit: it is released
        while waiting.state != states.REVOKED and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiting.state == states.REVOKED
        assert ran == [1]
    finally:
        stop_worker(worker, thread)


# ---------------------------------------------------------------------------- interruptions


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_soft_limit_passing_after_the_body_returned_does_not_rerun_the_task(kernel_app, pool):
    """The limit passes while the kernel records the outcome (a slow hook here): the
    task ran once and succeeded; nothing is raised into the bookkeeping."""
    from kernel import hookimpl

    runs = []

    class SlowHook:
        @hookimpl
        def kernel_task_success(self, task, result, request):
            time.sleep(0.5)  # past the soft limit, after the body returned

    kernel_app.plugins.register(SlowHook(), "slow-hook")

    @kernel_app.task(soft_time_limit=0.2)
    def quick():
        runs.append(1)
        return "done"

    worker, thread = start_worker(kernel_app, pool=pool, concurrency=1)
    try:
        result = quick.delay()
        assert result.get(timeout=TIMEOUT) == "done"
        follow = quick.delay()  # the next task is not hit by a stale interruption either
        assert follow.get(timeout=TIMEOUT) == "done"
        time.sleep(0.3)
        assert runs == [1, 1]
        assert worker.counts["requeued"] == 0
    finally:
        stop_worker(worker, thread)
