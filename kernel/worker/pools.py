"""Execution pools: where tasks run. ``solo`` (in the worker's thread), ``threads``,
``prefork`` (billiard child processes).

A pool is given jobs one at a time, never more than its ``limit`` at once (the
worker keeps the rest reserved, so warm shutdown can hand them back unstarted), and
reports each job's :class:`~kernel.worker.execute.Outcome`, or the error that lost it
(``WorkerLostError`` when a child process died), through ``on_done``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs

from kernel.exceptions import WorkerLostError
from kernel.protocol import DecodedTask
from kernel.worker.execute import Outcome, context_for, execute

log = logging.getLogger(__name__)

OnDone = Callable[[Outcome | None, BaseException | None], None]


@attrs.frozen
class Job:
    """A task to run, in a form that pickles to a child process."""

    decoded: DecodedTask
    hostname: str
    delivery_info: dict


def run_job(app: Any, job: Job) -> Outcome:
    """Run one job with ``app``; errors of the kernel itself (not the task's) requeue it."""
    try:
        task = app.get_task(job.decoded.name)
        context = context_for(job.decoded, job.hostname, job.delivery_info)
        outcome, _meta = execute(task, context)
        return outcome
    except Exception as exc:  # e.g. the result backend is unreachable
        log.exception(
            "task %s[%s]: the kernel could not run it or store its result",
            job.decoded.name,
            job.decoded.id,
        )
        return Outcome(
            job.decoded.id, job.decoded.name, "ERROR", 0.0, repr(exc), requeue=True, reject=True
        )


class Pool:
    """Base class of pools; plugin pools (gevent) subclass it."""

    def __init__(self, worker: Any, concurrency: int) -> None:
        self.worker = worker
        self.app = worker.app
        self.limit = concurrency

    def start(self) -> None:
        """Create threads or processes."""

    def apply(self, job: Job, on_done: OnDone) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Wait for running jobs, then release resources (warm shutdown)."""

    def terminate(self) -> None:
        """Stop at once, abandoning running jobs (cold shutdown)."""
        self.stop()

    def info(self) -> dict:
        return {"pool": type(self).__name__, "limit": self.limit}


class SoloPool(Pool):
    """Runs each task in the worker's own thread, one at a time."""

    def __init__(self, worker: Any, concurrency: int) -> None:
        super().__init__(worker, 1)

    def apply(self, job: Job, on_done: OnDone) -> None:
        on_done(run_job(self.app, job), None)


class ThreadsPool(Pool):
    """Runs tasks in a thread pool; suits I/O-bound tasks."""

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(self.limit, thread_name_prefix="kernel-task")

    def apply(self, job: Job, on_done: OnDone) -> None:
        future = self._executor.submit(run_job, self.app, job)

        def done(fut: Any) -> None:
            error = fut.exception()
            on_done(None if error else fut.result(), error)

        future.add_done_callback(done)

    def stop(self) -> None:
        self._executor.shutdown(wait=True)

    def terminate(self) -> None:
        """Threads cannot be stopped from outside: wait for the running ones.

        Handing their messages back while they still run would run them twice.
        """
        self._executor.shutdown(wait=True, cancel_futures=True)


#: The app of this prefork child process, set once by the pool's initializer.
_child_app: Any = None


def _child_init(app: Any, worker: Any) -> None:
    global _child_app
    _child_app = app
    # Ctrl+C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    app.plugins.hook.kernel_worker_process_init(worker=worker, pid=os.getpid())


def _child_run(job: Job) -> Outcome:
    return run_job(_child_app, job)


class PreforkPool(Pool):
    """Runs tasks in child processes (billiard); a child that dies is replaced."""

    def start(self) -> None:
        from billiard.pool import Pool as BilliardPool

        self._pool = BilliardPool(
            processes=self.limit,
            initializer=_child_init,
            initargs=(self.app, self.worker),
            lost_worker_timeout=self.worker.lost_worker_timeout,
        )

    def apply(self, job: Job, on_done: OnDone) -> None:
        def succeeded(outcome: Outcome) -> None:
            on_done(outcome, None)

        def failed(error: Any) -> None:
            error = getattr(error, "exception", error)  # billiard wraps it in ExceptionInfo
            if type(error).__name__ == "WorkerLostError":  # billiard's class, not ours
                error = WorkerLostError(str(error).strip().splitlines()[-1])
            on_done(None, error)

        self._pool.apply_async(_child_run, (job,), callback=succeeded, error_callback=failed)

    def stop(self) -> None:
        self._pool.close()
        self._pool.join()

    def terminate(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def info(self) -> dict:
        return {
            "pool": "prefork",
            "limit": self.limit,
            "processes": [p.pid for p in self._pool._pool],
        }
