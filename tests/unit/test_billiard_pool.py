"""The prefork pool's billiard subclass: stops without sleeping, otherwise billiard's."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytest.importorskip("billiard")

from kernel.worker.billiard_pool import PromptPool  # noqa: E402

BOUND = 10.0  # seconds any wait below may take before the test fails


def _record_sleeps(path: str) -> None:
    """Child initializer: append every time.sleep() duration of this child to ``path``."""
    real_sleep = time.sleep

    def recording(seconds: float) -> None:
        with open(path, "a") as out:
            out.write(f"{seconds}\n")
        real_sleep(seconds)

    time.sleep = recording


def _pid(_: int) -> int:
    return os.getpid()


def _slept(path) -> list[float]:
    return [float(line) for line in path.read_text().split()] if path.exists() else []


def _stop(pool: PromptPool) -> None:
    pool.close()
    pool.join()


def test_children_told_to_stop_leave_without_the_goodbye_sleep(tmp_path):
    sleeps = tmp_path / "sleeps"
    pool = PromptPool(processes=2, initializer=_record_sleeps, initargs=(str(sleeps),))
    pids = {pool.apply_async(_pid, (i,)).get(timeout=BOUND) for i in range(4)}
    _stop(pool)
    assert pids
    assert [child.exitcode for child in pool._pool] == [0, 0]
    assert 1 not in _slept(sleeps)


def test_a_child_leaving_for_its_own_reasons_keeps_billiards_goodbye(monkeypatch):
    """Recycled (max tasks or memory) or failed children exit through billiard's own
    _do_exit, sleep included, so their last result reaches the pool; only the pool's
    sentinel skips it. (Checked on the method: with real recycled children the pool
    may end one before it gets that far, which made a process-level test flaky.)"""
    import billiard.pool

    from kernel.worker.billiard_pool import PromptWorker

    calls = []
    monkeypatch.setattr(
        billiard.pool.Worker,
        "_do_exit",
        lambda self, pid, exitcode, exc=None: calls.append((exitcode, exc)),
    )
    worker = PromptWorker.__new__(PromptWorker)
    failure = ValueError("boom")
    worker._do_exit(123, 3)  # EX_RECYCLE
    worker._do_exit(123, None, failure)
    assert calls == [(3, None), (None, failure)]

    class Left(Exception):
        pass

    def leave(code):
        raise Left(code)

    sent = []
    worker.on_exit, worker.outq = None, type("Q", (), {"put": lambda self, m: sent.append(m)})()
    monkeypatch.setattr(os, "_exit", leave)
    with pytest.raises(Left):
        worker._do_exit(123, None)  # the pool's sentinel: no goodbye sleep
    assert calls == [(3, None), (None, failure)] and len(sent) == 1


def test_supervisor_still_replaces_a_child_killed_mid_task():
    pool = PromptPool(processes=1, lost_worker_timeout=1)
    try:
        started = []
        lost = pool.apply_async(time.sleep, (60,), accept_callback=lambda *a: started.append(a))
        deadline = time.monotonic() + BOUND
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)
        victim = pool._pool[0].pid
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(Exception) as failure:
            lost.get(timeout=BOUND)
        lost_error = getattr(failure.value, "exc", failure.value)  # billiard wraps it
        assert type(lost_error).__name__ == "WorkerLostError", lost_error
        assert pool.apply_async(_pid, (1,)).get(timeout=BOUND) != victim
    finally:
        _stop(pool)


def test_supervisor_and_timeout_handler_never_sleep_unwakeably(monkeypatch):
    # billiard's slept 0.8 s and 1 s per round with time.sleep, which close() and
    # terminate() then waited out; these wait on an event that close/terminate set.
    slept = []
    real_sleep = time.sleep

    def recording(seconds: float) -> None:
        slept.append((threading.current_thread().name, seconds))
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", recording)
    pool = PromptPool(processes=1, enable_timeouts=True)
    pool.apply_async(_pid, (0,)).get(timeout=BOUND)
    real_sleep(1.5)  # past the supervisor's start-up burst and a timeout round
    _stop(pool)
    pool.terminate()
    assert not pool._worker_handler.is_alive()
    assert not pool._timeout_handler.is_alive()
    handlers = {pool._worker_handler.name, pool._timeout_handler.name}
    assert [entry for entry in slept if entry[0] in handlers] == []
