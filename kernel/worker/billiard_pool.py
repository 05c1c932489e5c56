"""Billiard's process pool, stopping without waiting out its sleeps.

A warm stop of billiard's pool (``close()`` then ``join()``) took about 1.5-2 s on an
idle pool, all of it sleeping:

- the supervisor thread (it replaces children that died) sleeps 0.8 s between rounds
  and is joined by ``close()``;
- the timeout handler sleeps 1 s between rounds and is joined when the pool is
  finalized (at interpreter exit for a worker);
- a child leaving sends a goodbye (``DEATH``) to the result handler and sleeps 1 s
  so that the parent reads it before the child is gone (the result handler ends the
  sleep with ``SIGTERM``); during a stop the result handler has already gone, so
  ``join()`` waited out the whole second.

Here the two threads wait on an event that ``close``/``terminate`` set (same rounds
otherwise), and a child told to leave by the pool itself (the stop sentinel, or the
pool's pipe closed) says goodbye without the sleep. A child leaving for any other
reason (recycled after ``max_tasks_per_child``, over its memory limit, signalled)
keeps billiard's sleep, so its last result is read before its exit is noticed.

Imported only when a prefork pool starts, so that other pools never import billiard.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from billiard.common import restart_state
from billiard.exceptions import RestartFreqExceeded
from billiard.pool import DEATH, RUN, Supervisor, TimeoutHandler, Worker
from billiard.pool import Pool as _BilliardPool

#: Seconds between rounds, and the start-up burst (rounds, seconds apart): billiard's.
ROUND_INTERVAL = 0.8
BURST_ROUNDS, BURST_INTERVAL = 10, 0.1


class _Wakeable:
    """A billiard pool thread whose waits end when it is closed or terminated."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake = threading.Event()

    def close(self) -> None:
        super().close()  # type: ignore[misc]
        self._wake.set()

    def terminate(self) -> None:
        super().terminate()  # type: ignore[misc]
        self._wake.set()


class PromptSupervisor(_Wakeable, Supervisor):
    """Replaces dead children like billiard's, and exits as soon as the pool closes."""

    def _running(self) -> bool:
        return self._state == RUN and self.pool._state == RUN

    def body(self) -> None:
        pool = self.pool
        if self._wake.wait(ROUND_INTERVAL):
            return
        try:
            # Children failing right at start-up should stop the pool quickly: a
            # stricter restart limit during the burst, as billiard does.
            usual = pool.restart_state
            pool.restart_state = restart_state(10 * pool._processes, 1)
            for _ in range(BURST_ROUNDS):
                if not self._running():
                    break
                pool._maintain_pool()
                if self._wake.wait(BURST_INTERVAL):
                    break
            pool.restart_state = usual
            while self._running():
                pool._maintain_pool()
                self._wake.wait(ROUND_INTERVAL)
        except RestartFreqExceeded:
            pool.close()
            pool.join()
            raise


class PromptTimeoutHandler(_Wakeable, TimeoutHandler):
    """Checks time limits once a second, like billiard's, and exits when told to."""

    #: Seconds between checks of the running jobs' deadlines: billiard's.
    INTERVAL = 1.0

    def body(self) -> None:
        # handle_timeouts() checks every running job once per step, until closed.
        for _ in self.handle_timeouts():
            if self._wake.wait(self.INTERVAL):
                return


class PromptWorker(Worker):
    """A pool child that leaves at once when the pool told it to."""

    def _do_exit(self, pid: int, exitcode: int | None, exc: BaseException | None = None) -> None:
        # billiard records every sys.exit() status (a task's, a recycle's, a signal
        # handler's); only the pool's own sentinel or a closed pipe leaves none.
        if exitcode is not None or exc is not None or not hasattr(signal, "pthread_sigmask"):
            super()._do_exit(pid, exitcode, exc)
            return
        try:
            if self.on_exit is not None:
                self.on_exit(pid, 0)
            # As billiard does: a SIGTERM arriving mid-write would leave outq locked.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                self.outq.put((DEATH, (pid, 0)))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        finally:
            os._exit(0)


class PromptPool(_BilliardPool):
    """billiard.pool.Pool whose ``close()``, ``join()`` and finalizer do not sleep."""

    Worker = PromptWorker
    Supervisor = PromptSupervisor
    TimeoutHandler = PromptTimeoutHandler
