"""The gevent pool: each task runs in a greenlet of the worker's own thread.

Greenlets switch only where they wait (a socket, ``time.sleep``, a lock), which the
monkey-patching of :mod:`kernel_gevent.patch` makes cooperative: a thousand tasks
waiting on I/O cost a thousand small stacks, not a thousand threads. A task that
computes without waiting holds every other task (and the worker's own loop) until
it is done; use ``prefork`` for CPU-bound work.

Interruptions (soft and hard time limits, ``revoke(terminate=True)``, a cold
shutdown) are exceptions thrown into the task's greenlet at the point where it
waits. As with the threads pool they land only while the task's body runs (the
:class:`~kernel.worker.execute.InterruptGuard` protocol), never in the kernel's
bookkeeping around it. They are thrown from the hub, so a check and the throw happen
without any other greenlet running in between.

- soft time limit: ``SoftTimeLimitExceeded`` in the body, which may catch it;
- hard time limit: :class:`HardTimeLimit`, a ``BaseException`` the body's
  ``except Exception`` does not catch, after which the task is failed with
  ``TimeLimitExceeded`` as the other pools do;
- terminate: billiard's ``Terminated``, stored as REVOKED;
- cold shutdown: every running greenlet is killed; their messages, unacknowledged,
  go back to the broker when the worker's connection closes.

A greenlet busy computing never reaches a wait, so none of these can stop it.
"""

from __future__ import annotations

import logging
from typing import Any

import gevent
import gevent.pool

from kernel.exceptions import (
    ConfigurationError,
    SoftTimeLimitExceeded,
    Terminated,
    TimeLimitExceeded,
    WorkerLostError,
)
from kernel.worker.execute import InterruptGuard, set_interrupt_guard
from kernel.worker.pools import Job, JobHandle, OnDone, Pool, run_job
from kernel_gevent.patch import is_patched

log = logging.getLogger(__name__)

#: Seconds a cold shutdown waits for killed greenlets to unwind.
KILL_TIMEOUT = 5.0


class HardTimeLimit(BaseException):
    """Thrown into a task past its hard time limit; ``except Exception`` in the task
    does not catch it, so the task stops."""


class ColdShutdown(BaseException):
    """Thrown into every running task by a cold shutdown."""


class _GreenletJob(JobHandle, InterruptGuard):
    """One task's greenlet and what may interrupt it (see the module docstring)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.greenlet: gevent.Greenlet | None = None
        self.armed = False
        self.finished = False
        #: The exception to throw when the body runs (or at once, if it does).
        self.pending: type[BaseException] | None = None
        self.hard_limit_reached = False
        self.timers: list[Any] = []

    # -- InterruptGuard: called in the task's greenlet -----------------------------------

    def arm(self) -> None:
        self.armed = True
        pending, self.pending = self.pending, None
        if pending is not None:  # its deadline passed, or it was revoked, before the body
            raise self._instance(pending)

    def disarm(self) -> None:
        self.armed = False
        self.finished = True
        self.pending = None
        self.stop_timers()

    # -- interruptions: any greenlet or the hub ------------------------------------------

    def interrupt(self, exc_type: type[BaseException]) -> bool:
        if self.finished:
            return False
        if self.pending is not None and _rank(self.pending) > _rank(exc_type):
            return True  # a terminate or hard limit is never downgraded
        self.pending = exc_type
        gevent.get_hub().loop.run_callback(self._deliver)
        return True

    def _deliver(self) -> None:
        """In the hub: throw the pending exception if the body is still running."""
        glet, pending = self.greenlet, self.pending
        if not self.armed or pending is None or glet is None or glet.dead:
            return  # not begun yet (``arm`` raises it) or done
        self.pending = None
        glet.throw(self._instance(pending))

    def _instance(self, exc_type: type[BaseException]) -> BaseException:
        if exc_type is Terminated:
            return Terminated(15)
        if exc_type is HardTimeLimit:
            self.hard_limit_reached = True
            return HardTimeLimit(self.job.time_limit)
        return exc_type()

    def terminate(self, signum: int) -> bool:
        return self.interrupt(Terminated)

    # -- time limits ---------------------------------------------------------------------

    def start_timers(self) -> None:
        loop = gevent.get_hub().loop
        limits = ((self.job.soft_time_limit, SoftTimeLimitExceeded),)
        limits += ((self.job.time_limit, HardTimeLimit),)
        for seconds, exc_type in limits:
            if seconds:
                timer = loop.timer(float(seconds))
                timer.start(self.interrupt, exc_type)
                self.timers.append(timer)

    def stop_timers(self) -> None:
        for timer in self.timers:
            timer.close()
        self.timers.clear()


def _rank(exc_type: type[BaseException]) -> int:
    """Which interruption wins when two are pending: the strongest."""
    return {SoftTimeLimitExceeded: 1, Terminated: 2, HardTimeLimit: 3, ColdShutdown: 4}.get(
        exc_type, 0
    )


class GeventPool(Pool):
    """Runs each task in a greenlet; at most ``limit`` at once (the worker's window)."""

    def start(self) -> None:
        if not is_patched():
            raise ConfigurationError(
                "the gevent pool needs the standard library monkey-patched before the app "
                "is imported: start the worker with `kernel worker -P gevent` (not the "
                "worker_pool setting, which is read after the app is imported), or call "
                "`from gevent import monkey; monkey.patch_all()` first thing in the "
                "program that creates the Worker"
            )
        self._greenlets = gevent.pool.Group()
        self._running: dict[gevent.Greenlet, _GreenletJob] = {}

    def apply(self, job: Job, on_done: OnDone) -> JobHandle:
        handle = _GreenletJob(job)
        glet = gevent.Greenlet(self._run, handle, on_done)
        handle.greenlet = glet
        self._running[glet] = handle
        self._greenlets.start(glet)
        return handle

    def _run(self, handle: _GreenletJob, on_done: OnDone) -> None:
        job = handle.job
        outcome = None
        error: BaseException | None = None
        set_interrupt_guard(handle)
        handle.start_timers()
        try:
            outcome = run_job(self.app, job)
        except HardTimeLimit:
            error = TimeLimitExceeded(job.time_limit)
        except ColdShutdown:
            error = WorkerLostError("stopped by a cold shutdown")
        except Terminated as exc:  # revoked before its body began
            error = exc
        except BaseException as exc:  # never lose a job's outcome to a greenlet's death
            log.exception("task %s[%s]: its greenlet failed", job.decoded.name, job.decoded.id)
            error = exc
        finally:
            set_interrupt_guard(None)
            handle.disarm()
            self._running.pop(gevent.getcurrent(), None)
        if handle.hard_limit_reached and error is None:
            # The body caught the hard limit and went on; it still ran past it.
            error = TimeLimitExceeded(job.time_limit)
        on_done(outcome, error)

    def grow(self, n: int) -> int:
        self.limit += n
        return n

    def shrink(self, n: int) -> int:
        removed = max(0, min(n, self.limit - 1))
        self.limit -= removed
        return removed

    def stop(self) -> None:
        """Warm shutdown: wait for every running task."""
        self._greenlets.join()

    def terminate(self) -> None:
        """Cold shutdown: stop every running task where it waits. Their messages are
        not acknowledged; the broker gives them back when the connection closes."""
        for handle in list(self._running.values()):
            handle.stop_timers()
        self._greenlets.kill(ColdShutdown, block=True, timeout=KILL_TIMEOUT)

    def info(self) -> dict:
        return {"pool": "gevent", "limit": self.limit, "running": len(self._running)}
