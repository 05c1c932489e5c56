"""Execution pools: where tasks run. ``solo`` (in the worker's thread), ``threads``,
``prefork`` (billiard child processes).

A pool is given jobs one at a time, never more than its ``capacity`` at once (the
worker keeps the rest reserved, so warm shutdown can hand them back unstarted), and
reports each job's :class:`~kernel.worker.execute.Outcome`, or the error that lost it,
through ``on_done``: ``WorkerLostError`` when a child process died,
``TimeLimitExceeded`` when the hard time limit killed it, ``Terminated`` when a
revoke with ``terminate=True`` stopped it, :class:`NotStarted` when a job was
cancelled, or expired, before it began.

``capacity`` is ``limit`` for most pools. The prefork pool takes twice as many: each
child finds its next job waiting when it finishes one, instead of idling while the
result travels to the worker and a new job travels back (a third more tasks per
second on a busy worker). Those queued jobs can still be cancelled
(:meth:`JobHandle.cancel`): a revoke keeps them from starting, and a warm shutdown
takes them back, so nothing runs that would not have run without the look-ahead.

What each pool can enforce is declared in its ``PoolSpec.supports``; the worker
says at start-up which configured controls a pool cannot enforce.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import attrs

from kernel.exceptions import SoftTimeLimitExceeded, Terminated, WorkerLostError
from kernel.protocol import DecodedTask
from kernel.worker.execute import (
    InterruptGuard,
    Outcome,
    context_for,
    execute,
    set_interrupt_guard,
)

log = logging.getLogger(__name__)

OnDone = Callable[[Outcome | None, BaseException | None], None]


class NotStarted(Exception):
    """No process began the job: it was cancelled (:meth:`JobHandle.cancel`), or it
    expired while it waited in the pool."""


@attrs.frozen
class Job:
    """A task to run, in a form that pickles to a child process.

    ``soft_time_limit`` and ``time_limit`` are the limits the worker resolved for it
    (message header, then task option, then worker default); None means none.
    """

    decoded: DecodedTask
    hostname: str
    delivery_info: dict
    soft_time_limit: float | None = None
    time_limit: float | None = None


def run_job(app: Any, job: Job) -> Outcome:
    """Run one job with ``app``; errors of the kernel itself (not the task's) requeue it."""
    try:
        task = app.get_task(job.decoded.name)
        context = context_for(job.decoded, job.hostname, job.delivery_info)
        outcome, _meta = execute(task, context)
        return outcome
    except Terminated:  # a revoke stopped it before its body began
        log.warning("task %s[%s] terminated before it began", job.decoded.name, job.decoded.id)
        _store_safely(app.backend.mark_as_revoked, job.decoded.id, "terminated")
        return Outcome(job.decoded.id, job.decoded.name, "REVOKED", 0.0, "terminated")
    except SoftTimeLimitExceeded:  # its limit passed outside the body (slow hooks)
        log.error(
            "task %s[%s] reached its soft time limit outside its body",
            job.decoded.name,
            job.decoded.id,
        )
        return Outcome(job.decoded.id, job.decoded.name, "FAILURE", 0.0, "soft time limit")
    except Exception as exc:  # e.g. the result backend is unreachable
        log.exception(
            "task %s[%s]: the kernel could not run it or store its result",
            job.decoded.name,
            job.decoded.id,
        )
        return Outcome(
            job.decoded.id, job.decoded.name, "ERROR", 0.0, repr(exc), requeue=True, reject=True
        )


def _store_safely(store: Callable[..., Any], *args: Any) -> None:
    try:
        store(*args)
    except Exception:
        log.exception("could not store the state of task %s", args[0] if args else "?")


class JobHandle:
    """What the worker keeps of a job it handed to a pool: a way to stop it."""

    def cancel(self) -> bool:
        """Keep the job from starting if no process has begun it yet; True when asked
        (its ``on_done`` then reports :class:`NotStarted`, or its outcome if it had
        already begun). Only pools that queue jobs ahead of their processes can."""
        return False

    def terminate(self, signum: int) -> bool:
        """Stop the running job (revoke with ``terminate=True``); False if impossible."""
        return False


class Pool:
    """Base class of pools; plugin pools (gevent) subclass it."""

    def __init__(self, worker: Any, concurrency: int) -> None:
        self.worker = worker
        self.app = worker.app
        self.limit = concurrency

    @property
    def capacity(self) -> int:
        """How many jobs the pool takes at once: ``limit`` running, plus any it queues
        ahead of its processes (their handles can :meth:`~JobHandle.cancel`)."""
        return self.limit

    def start(self) -> None:
        """Create threads or processes."""

    def apply(self, job: Job, on_done: OnDone) -> JobHandle | None:
        raise NotImplementedError

    def grow(self, n: int) -> int:
        """Add ``n`` slots (autoscale); returns how many were added."""
        return 0

    def shrink(self, n: int) -> int:
        """Remove up to ``n`` idle slots (autoscale); returns how many were removed."""
        return 0

    def stop(self) -> None:
        """Wait for running jobs, then release resources (warm shutdown)."""

    def terminate(self) -> None:
        """Stop at once, abandoning running jobs (cold shutdown)."""
        self.stop()

    def info(self) -> dict:
        return {"pool": type(self).__name__, "limit": self.limit}


# ---------------------------------------------------------------------------- solo


class SoloPool(Pool):
    """Runs each task in the worker's own thread, one at a time.

    A soft time limit is a ``SIGALRM`` timer that raises ``SoftTimeLimitExceeded``
    in the task (when the worker runs in the main thread; elsewhere, as in tests, the
    exception is raised in the thread like the threads pool does). A hard limit cannot
    be enforced without a second process.
    """

    def __init__(self, worker: Any, concurrency: int) -> None:
        super().__init__(worker, 1)
        self._deadlines: _Deadlines | None = None

    def apply(self, job: Job, on_done: OnDone) -> None:
        soft = job.soft_time_limit
        if not soft:
            on_done(run_job(self.app, job), None)
        elif threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            guard = _AlarmGuard(soft)
            previous = signal.signal(signal.SIGALRM, guard.on_alarm)
            set_interrupt_guard(guard)
            try:
                outcome = run_job(self.app, job)
            finally:
                set_interrupt_guard(None)
                guard.disarm()
                signal.signal(signal.SIGALRM, previous)
            on_done(outcome, None)
        else:
            if self._deadlines is None:
                self._deadlines = _Deadlines()
            handle = _ThreadJob()
            self._deadlines.add(soft, handle)
            try:
                outcome = _run_interruptible(self.app, job, handle)
            except SoftTimeLimitExceeded as exc:  # landed before the task began
                on_done(None, exc)
            else:
                on_done(outcome, None)
        return None

    def stop(self) -> None:
        if self._deadlines is not None:
            self._deadlines.stop()


class _AlarmGuard(InterruptGuard):
    """A ``SIGALRM`` soft time limit that only raises while the task body runs."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = False
        self.fired = False

    def arm(self) -> None:
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def disarm(self) -> None:
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)

    def on_alarm(self, _signum: int, _frame: Any) -> None:
        if self.armed and not self.fired:
            self.fired = True
            raise SoftTimeLimitExceeded()


# ---------------------------------------------------------------------------- threads


def _async_raise(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Raise ``exc_type`` in another thread at its next bytecode (None cancels)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type) if exc_type else None
    )


class _ThreadJob(JobHandle, InterruptGuard):
    """A job on the threads pool: which thread runs it, so it can be interrupted.

    Exceptions are raised into the thread only while the task body runs (between
    ``arm`` and ``disarm``, under the lock), so one meant for this job never lands in
    the kernel's bookkeeping or in the thread's next job.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread_id: int | None = None
        self.armed = False
        self.finished = False
        self.interrupted: type[BaseException] | None = None

    def arm(self) -> None:
        with self.lock:
            self.armed = True
            pending = self.interrupted
        if pending is not None:  # its deadline passed before the body began
            raise pending()

    def disarm(self) -> None:
        with self.lock:
            self.armed = False
            self.finished = True
            if self.thread_id is not None:
                _async_raise(self.thread_id, None)  # cancel one not yet raised

    def interrupt(self, exc_type: type[BaseException]) -> bool:
        with self.lock:
            if self.finished:
                return False
            if self.interrupted is Terminated:  # a terminate is never downgraded
                return True
            self.interrupted = exc_type
            if self.armed and self.thread_id is not None:
                _async_raise(self.thread_id, exc_type)
            return True

    def terminate(self, signum: int) -> bool:
        return self.interrupt(Terminated)


class _Deadlines:
    """One timer thread for all soft time limits of a threads pool (not one per job)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _ThreadJob]] = []
        self._sequence = itertools.count()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._compact_at = 1024

    def add(self, seconds: float, handle: _ThreadJob) -> None:
        with self._wakeup:
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._sequence), handle))
            if len(self._heap) >= self._compact_at:  # drop finished jobs' deadlines
                self._heap = [entry for entry in self._heap if not entry[2].finished]
                heapq.heapify(self._heap)
                self._compact_at = max(1024, 2 * len(self._heap))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="kernel-soft-time-limits", daemon=True
                )
                self._thread.start()
            self._wakeup.notify()

    def stop(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()

    def _run(self) -> None:
        with self._wakeup:
            while not self._stopped:
                if not self._heap:
                    self._wakeup.wait()
                    continue
                due, _, handle = self._heap[0]
                delay = due - time.monotonic()
                if delay > 0:
                    self._wakeup.wait(delay)
                    continue
                heapq.heappop(self._heap)
                if not handle.finished:
                    handle.interrupt(SoftTimeLimitExceeded)


def _run_interruptible(app: Any, job: Job, handle: _ThreadJob) -> Outcome:
    """Run ``job`` in this thread, where ``handle`` may raise an exception into its body."""
    try:
        with handle.lock:
            if handle.interrupted is Terminated:  # revoked before it started
                handle.finished = True
                raise Terminated(signal.SIGTERM)
            handle.thread_id = threading.get_ident()
        set_interrupt_guard(handle)
        return run_job(app, job)
    finally:
        set_interrupt_guard(None)
        handle.disarm()


class ThreadsPool(Pool):
    """Runs tasks in a thread pool; suits I/O-bound tasks.

    Soft time limits and ``terminate`` raise an exception inside the task's thread,
    which takes effect at its next Python bytecode (not inside a blocking C call).
    Threads cannot be killed, so hard time limits are not enforced.
    """

    def start(self) -> None:
        autoscale = getattr(self.worker, "autoscale", None)
        threads = max(self.limit, autoscale[0] if autoscale else 0)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="kernel-task")
        self._max_threads = threads
        self._deadlines = _Deadlines()

    def apply(self, job: Job, on_done: OnDone) -> JobHandle:
        handle = _ThreadJob()
        future = self._executor.submit(self._run, job, handle)
        if job.soft_time_limit:
            self._deadlines.add(job.soft_time_limit, handle)

        def done(fut: Any) -> None:
            error = fut.exception()
            on_done(None if error else fut.result(), error)

        future.add_done_callback(done)
        return handle

    def _run(self, job: Job, handle: _ThreadJob) -> Outcome:
        return _run_interruptible(self.app, job, handle)

    def grow(self, n: int) -> int:
        added = max(0, min(n, self._max_threads - self.limit))
        self.limit += added
        return added

    def shrink(self, n: int) -> int:
        removed = max(0, min(n, self.limit - 1))
        self.limit -= removed
        return removed

    def stop(self) -> None:
        self._executor.shutdown(wait=True)
        self._deadlines.stop()

    def terminate(self) -> None:
        """Threads cannot be stopped from outside: wait for the running ones.

        Handing their messages back while they still run would run them twice.
        """
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._deadlines.stop()


# ---------------------------------------------------------------------------- prefork

#: The app of this prefork child process, set once by the pool's initializer.
_child_app: Any = None
#: The job states shared with the worker (:class:`_StartSlots`).
_child_slots: _StartSlots | None = None


def _child_init(app: Any, worker: Any, slots: _StartSlots | None = None) -> None:
    global _child_app, _child_slots
    _child_app = app
    _child_slots = slots
    # Ctrl+C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    app.plugins.hook.kernel_worker_process_init(worker=worker, pid=os.getpid())


class _ChildGuard(InterruptGuard):
    """Billiard signals a soft time limit with SIGUSR1: raise only inside the body.

    The signal goes to a process, not a job: one sent for a task that finished an
    instant before reaches the child's next task (queued ahead, it began at once).
    Billiard counts a limit from when it hears the job began, later than the child
    began it, so a signal that comes sooner after the start than the current task's
    own soft limit was meant for the task before; it is ignored."""

    armed = False
    began = 0.0
    soft_limit: float | None = None

    def arm(self) -> None:
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def on_signal(self, _signum: int, _frame: Any) -> None:
        if not self.armed:
            return
        if self.soft_limit and time.monotonic() - self.began < self.soft_limit:
            return  # meant for the task this child ran before
        self.armed = False  # once per task
        raise SoftTimeLimitExceeded()


_child_guard: _ChildGuard | None = None


#: What a child returns for a job it did not begin: the worker cancelled it (a revoke,
#: a warm shutdown) or it expired while it waited in the pool.
NOT_STARTED = "kernel:not-started"


def _should_not_start(job: Job, slot: int) -> bool:
    if _child_slots is not None and not _child_slots.start(slot):
        return True  # cancelled while it waited in the pool
    expires = job.decoded.expires
    return expires is not None and expires <= datetime.now(timezone.utc)


def _child_run(job: Job, slot: int = -1) -> Outcome | str:
    """Run ``job`` in this child unless it may not start; ``slot`` is its place in
    the shared start states (-1: none, it cannot be cancelled)."""
    global _child_guard
    if _should_not_start(job, slot):
        return NOT_STARTED
    if _child_guard is None:  # after billiard installed its own handler
        _child_guard = _ChildGuard()
        signal.signal(signal.SIGUSR1, _child_guard.on_signal)
        set_interrupt_guard(_child_guard)
    _child_guard.began, _child_guard.soft_limit = time.monotonic(), job.soft_time_limit
    return run_job(_child_app, job)


class _StartSlots:
    """Whether each queued job began, in memory shared with the children.

    A job's slot is QUEUED from ``apply`` until a child moves it to STARTED just
    before beginning it, unless the worker moved it to CANCELLED first; one lock
    shared by the processes makes the two moves exclusive, so the worker knows
    for sure whether a job it cancelled will run. A slot belongs to one job until
    its result arrives; jobs beyond :attr:`SIZE` at once (after autoscaling far up)
    get none and cannot be cancelled, only terminated."""

    SIZE = 1024
    QUEUED, CANCELLED, STARTED = 0, 1, 2

    def __init__(self) -> None:
        import billiard
        from billiard.sharedctypes import RawArray

        self.states = RawArray(ctypes.c_byte, self.SIZE)
        self.lock = billiard.Lock()
        self._free = list(range(self.SIZE - 1, -1, -1))
        self._free_lock = threading.Lock()

    def __getstate__(self) -> dict:
        """What a child needs (pools that spawn rather than fork pickle it)."""
        return {"states": self.states, "lock": self.lock}

    def take(self) -> int:
        with self._free_lock:
            slot = self._free.pop() if self._free else -1
        if slot >= 0:
            self.states[slot] = self.QUEUED
        return slot

    def give_back(self, slot: int) -> None:
        if slot >= 0:
            with self._free_lock:
                self._free.append(slot)

    def cancel(self, slot: int) -> bool:
        """True if the job will not start (it had not); False if it began."""
        if slot < 0:
            return False
        with self.lock:
            if self.states[slot] == self.QUEUED:
                self.states[slot] = self.CANCELLED
            return self.states[slot] == self.CANCELLED

    def start(self, slot: int) -> bool:
        """In the child: True if the job may begin (it is now STARTED)."""
        if slot < 0:
            return True
        with self.lock:
            if self.states[slot] == self.CANCELLED:
                return False
            self.states[slot] = self.STARTED
            return True


def _unwrap(error: Any) -> Any:
    """Billiard reports errors as ExceptionInfo(ExceptionWithTraceback(exc)): get exc."""
    error = getattr(error, "exception", error)
    return getattr(error, "exc", error)


class _PreforkJob(JobHandle):
    """A job on the prefork pool; billiard tells which child accepted it."""

    def __init__(self, pool: PreforkPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.pid: int | None = None
        self.pending_signal: int | None = None
        self.finished = False
        self.cancelled = False
        self.counted = False
        self.lock = threading.Lock()

    def accepted(self, pid: int, _time: float) -> None:  # billiard's result thread
        with self.lock:
            self.pid = pid
            stopped = self.finished or self.cancelled  # its child already moved on
            signum = None if stopped else self.pending_signal
        self.taken()
        if signum is not None:
            self.pool.terminate_job(pid, signum)

    def taken(self) -> None:
        """The job left billiard's queue (a child took it, or it ended): counted once."""
        with self.lock:
            if self.counted:
                return
            self.counted = True
        self.pool.count_unaccepted(-1)

    def finish(self) -> None:
        """Its result arrived: its child may run another job now, never signal it."""
        with self.lock:
            self.finished = True
            slot, self.slot = self.slot, -1
        self.pool.start_slots.give_back(slot)
        self.taken()

    def cancel(self) -> bool:
        """True when the job will not start; False when a child began it (or it ended)."""
        with self.lock:
            if self.finished or self.slot < 0:
                return False
            if not self.cancelled:
                self.cancelled = self.pool.start_slots.cancel(self.slot)
            return self.cancelled

    def terminate(self, signum: int) -> bool:
        if self.cancel():
            return True  # it will never start: there is nothing to signal
        with self.lock:
            if self.finished:
                return False
            if self.pid is None:  # begun, but billiard has not said in which child yet
                self.pending_signal = signum
                return True
            pid = self.pid
        self.pool.terminate_job(pid, signum)
        return True


class PreforkPool(Pool):
    """Runs tasks in child processes (billiard); a child that dies is replaced.

    Billiard enforces the time limits (soft: ``SIGUSR1`` raising
    ``SoftTimeLimitExceeded`` in the child; hard: the child is killed and replaced),
    recycles children after ``max_tasks_per_child`` tasks or above
    ``max_memory_per_child`` KiB, and grows or shrinks for autoscale.
    Time limits are checked about once a second.
    """

    @property
    def capacity(self) -> int:
        """One job queued per child besides the one it runs (see the module's doc)."""
        return self.limit * 2

    def start(self) -> None:
        from kernel.worker.billiard_pool import PromptPool

        worker = self.worker
        self.start_slots = _StartSlots()
        self._pool = PromptPool(
            processes=self.limit,
            initializer=_child_init,
            initargs=(self.app, worker, self.start_slots),
            lost_worker_timeout=worker.lost_worker_timeout,
            maxtasksperchild=getattr(worker, "max_tasks_per_child", None) or None,
            max_memory_per_child=getattr(worker, "max_memory_per_child", None) or None,
            enable_timeouts=True,
        )

    #: Jobs handed to billiard that no child has taken yet.
    unaccepted = 0
    _unaccepted_lock = threading.Lock()

    def count_unaccepted(self, change: int) -> None:
        with self._unaccepted_lock:
            self.unaccepted += change

    def apply(self, job: Job, on_done: OnDone) -> JobHandle:
        handle = _PreforkJob(self, self.start_slots.take())
        self.count_unaccepted(+1)

        def succeeded(outcome: Outcome | str) -> None:
            handle.finish()
            if outcome == NOT_STARTED:
                on_done(None, NotStarted(job.decoded.id))
            else:
                on_done(outcome, None)  # type: ignore[arg-type]

        def failed(error: Any) -> None:
            handle.finish()
            error = _unwrap(error)
            if type(error).__name__ == "WorkerLostError":  # billiard's class, not ours
                error = WorkerLostError(str(error).strip().splitlines()[-1])
            on_done(None, error)

        self._pool.apply_async(
            _child_run,
            (job, handle.slot),
            callback=succeeded,
            error_callback=failed,
            accept_callback=handle.accepted,
            soft_timeout=job.soft_time_limit,
            timeout=job.time_limit,
        )
        return handle

    def terminate_job(self, pid: int, signum: int) -> None:
        self._pool.terminate_job(pid, signum)

    def grow(self, n: int) -> int:
        self._pool.grow(n)
        self.limit += n
        return n

    def shrink(self, n: int) -> int:
        if self.unaccepted > 0:  # a child about to take a job would look idle
            return 0
        removed = 0
        for _ in range(n):
            try:
                self._pool.shrink(1)
            except ValueError:  # every child is busy
                break
            removed += 1
        self.limit -= removed
        return removed

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
