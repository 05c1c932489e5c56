"""The worker: consumes task messages, runs them in a pool, acknowledges after.

Flow of one message (all in the worker's main thread, which owns the connection):

1. ``_on_message`` decodes it; bad messages, unknown tasks and messages delivered
   too many times are dead-lettered with one log line and a FAILURE result.
2. It is *reserved* (prefetched) until the pool has a free slot; reserved messages
   were never started, so a warm shutdown hands them back to the broker.
3. ``_dispatch`` gives it to the pool; the pool reports an Outcome from its own
   thread through a queue, and ``_complete`` acks (or requeues) in this thread.

Controls applied here: rate limits (tasks waiting for a token wait per type, so
other types go on), revocation (``revoke_tasks``, called by the remote-control
node), time limits (resolved per message and enforced by the pool), autoscale.

Shutdown phases: the first SIGTERM/SIGINT is warm (stop consuming, finish running
tasks within ``worker_shutdown_timeout``, return reserved ones); the next signal, or
SIGQUIT, is soft when ``worker_soft_shutdown_timeout`` is set (running tasks get that
many more seconds) and cold otherwise; the next one is cold (stop the pool now and
return every unacknowledged message). ``REMAP_SIGTERM=SIGQUIT`` makes SIGTERM act as
SIGQUIT. In every phase no message is lost.

Broker connection loss (``broker_connection_retry``) is handled by
:class:`~kernel.worker.connection.BrokerLink`: running tasks go on, the worker
reconnects with back-off and resumes, and no acknowledgement is forgotten.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import queue as queue_module
import signal
import socket
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any

from kombu import Consumer, Queue
from kombu.exceptions import OperationalError

from kernel import states
from kernel.exceptions import (
    BrokerConnectionError,
    ColdShutdown,
    ConfigurationError,
    ContentDisallowed,
    NotRegistered,
    ProtocolError,
    TaskRevokedError,
    Terminated,
    TimeLimitExceeded,
    WorkerLostError,
    broker_connection_errors,
)
from kernel.exceptions import describe_broker_error as _describe
from kernel.plugins.manager import redact_url as _redact
from kernel.protocol import DELIVERY_COUNT_HEADER, DecodedTask, decode_task
from kernel.worker.autoscale import Autoscaler, parse_autoscale
from kernel.worker.connection import BrokerLink
from kernel.worker.execute import (
    call_hook_safely,
    chord_part_return,
    context_for,
    record_failure,
)
from kernel.worker.pools import Job, JobHandle, NotStarted, Pool
from kernel.worker.ratelimit import RateLimiter
from kernel.worker.state import RevokedTasks

log = logging.getLogger(__name__)

DEAD_LETTER_REASON_HEADER = "x-dead-letter-reason"

#: Shutdown phases, mildest first; a stop request only ever moves to a later one.
PHASES = ("warm", "soft", "cold")


def expand_hostname(template: str | None) -> str:
    """Expand Celery's ``%h`` (host), ``%n`` (short host), ``%d`` (domain)."""
    host = socket.gethostname()
    short, _, domain = host.partition(".")
    template = template or "kernel@%h"
    if "@" not in template:
        template = f"{template}@%h"
    return template.replace("%h", host).replace("%n", short).replace("%d", domain)


class Worker(BrokerLink):
    """Consume from ``queues`` and run tasks of ``app`` in a pool."""

    #: Seconds a drain waits for a message when tasks are (not) running.
    busy_poll = 0.02
    idle_poll = 0.1
    #: Seconds between looks for control messages (revoke, rate_limit, ping).
    control_poll = 0.1

    #: Messages held beyond the prefetch window (waiting for their ETA or a rate-limit
    #: token) at most; past that the window stops widening.
    held_limit = 1000

    def __init__(
        self,
        app: Any,
        *,
        hostname: str | None = None,
        pool: str | None = None,
        concurrency: int | None = None,
        queues: list[str] | None = None,
        prefetch_multiplier: int | None = None,
        lost_worker_timeout: float = 1.0,
        install_signal_handlers: bool = True,
        autoscale: Any = None,
        state_db: str | None = None,
    ) -> None:
        self.app = app
        app.finalize()
        conf = app.conf
        self.hostname = expand_hostname(hostname)
        self.pool_name = pool or conf.worker_pool
        self.pool_spec = app.plugins.pool(self.pool_name)
        self.autoscale = parse_autoscale(autoscale or conf.worker_autoscale)
        if self.autoscale and "autoscale" not in self.pool_spec.supports:
            raise ConfigurationError(
                f"pool {self.pool_name} cannot autoscale; use -P prefork or -P threads, "
                "or drop --autoscale"
            )
        default = self.pool_spec.default_concurrency
        if self.autoscale:
            concurrency = max(self.autoscale[1], 1)
        self.concurrency = int(
            concurrency or conf.worker_concurrency or (default() if default else 1)
        )
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        self.queue_names = list(queues or app.queue_names())
        self.prefetch_multiplier = (
            conf.worker_prefetch_multiplier if prefetch_multiplier is None else prefetch_multiplier
        )
        self.prefetch_count = self.concurrency * self.prefetch_multiplier
        self.lost_worker_timeout = lost_worker_timeout
        self.install_signal_handlers = install_signal_handlers
        self.max_tasks_per_child = conf.worker_max_tasks_per_child
        self.max_memory_per_child = conf.worker_max_memory_per_child
        self.features = app.broker_features()
        self.pool: Pool | None = None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._stop_mode: str | None = None  # None or one of PHASES
        self._phase_deadline = float("inf")
        self._interrupt_pending = False
        self._signals_installed = False
        self._next_control_poll = 0.0
        self._control_connection: Any = None
        self._completed: queue_module.SimpleQueue = queue_module.SimpleQueue()
        self._reserved: deque[tuple[Any, DecodedTask]] = deque()
        self._scheduled: list[tuple[float, int, Any, DecodedTask]] = []
        self._sequence = itertools.count()
        self._held = 0  # messages beyond the prefetch window the broker was told about
        self._inflight: dict[str, tuple[Any, DecodedTask]] = {}
        self._handles: dict[str, JobHandle | None] = {}
        self._terminating: dict[str, int] = {}  # delivery tag -> signal sent
        self._components: list[Any] = []
        self._control: Any = None
        self._consumer: Any = None
        self._producer: Any = None
        self._crash: BaseException | None = None
        self._init_broker_state()  # see kernel.worker.connection
        self.revoked = RevokedTasks.from_conf(conf, path=state_db)
        self.rate_limits = RateLimiter()
        self._configure_rate_limits()
        self.autoscaler = (
            Autoscaler(self, *self.autoscale, keepalive=conf.worker_autoscale_keepalive)
            if self.autoscale
            else None
        )
        self.counts = {
            "succeeded": 0,
            "failed": 0,
            "dead_lettered": 0,
            "requeued": 0,
            "revoked": 0,
        }
        self._report_unsupported_controls()
        self.app.plugins.hook.kernel_worker_init(worker=self)

    def _configure_rate_limits(self) -> None:
        if self.app.conf.worker_disable_rate_limits:
            return
        default = self.app.conf.task_default_rate_limit
        for name, task in self.app.tasks.items():
            rate = getattr(task, "rate_limit", None)
            try:
                self.rate_limits.configure(name, default if rate is None else rate)
            except ValueError as exc:
                raise ConfigurationError(f"task {name}: {exc}") from None

    def set_rate_limit(self, task_name: str, rate: Any) -> dict:
        """Change a task type's rate limit at run time (remote control ``rate_limit``)."""
        if task_name not in self.app.tasks:
            raise ValueError(f"unknown task {task_name!r} on worker {self.hostname}")
        if self.app.conf.worker_disable_rate_limits:
            return {"ok": "rate limits disabled (worker_disable_rate_limits)"}
        per_second = self.rate_limits.configure(task_name, rate)
        log.info("rate limit of %s set to %s", task_name, rate)
        return {"ok": f"new rate limit set to {per_second or 'none'} task(s)/s"}

    def _report_unsupported_controls(self) -> None:
        """Say once, at start-up, which configured controls this pool cannot enforce."""
        conf, tasks = self.app.conf, self.app.tasks.values()
        wanted = {
            "hard_time_limit": (
                "hard time limits (time_limit)",
                conf.task_time_limit or any(t.time_limit for t in tasks),
            ),
            "soft_time_limit": (
                "soft time limits (soft_time_limit)",
                conf.task_soft_time_limit or any(t.soft_time_limit for t in tasks),
            ),
            "max_tasks_per_child": (
                "--max-tasks-per-child",
                conf.worker_max_tasks_per_child,
            ),
            "max_memory_per_child": (
                "--max-memory-per-child",
                conf.worker_max_memory_per_child,
            ),
        }
        for control, (label, configured) in wanted.items():
            if configured and control not in self.pool_spec.supports:
                log.warning(
                    "pool %s does not enforce %s; tasks run without them", self.pool_name, label
                )

    # ----------------------------------------------------------------- control

    def stop(self, warm: bool = True, phase: str | None = None) -> None:
        """Ask the worker to stop (thread-safe); a later phase overrides an earlier one.

        ``phase`` is one of "warm", "soft", "cold"; ``warm=False`` means "cold".
        """
        phase = phase or ("warm" if warm else "cold")
        current = self._stop_mode
        if current is not None and PHASES.index(phase) <= PHASES.index(current):
            return
        self._stop_mode = phase
        if phase == "warm":
            self._phase_deadline = time.monotonic() + self.app.conf.worker_shutdown_timeout
        elif phase == "soft":
            self._phase_deadline = time.monotonic() + self.app.conf.worker_soft_shutdown_timeout
        solo_running = self.pool_name == "solo" and self._inflight
        if phase != "cold" and solo_running and self._signals_installed:
            # The task runs in this very thread, so no loop can watch the deadline.
            timer = threading.Timer(
                self._phase_deadline - time.monotonic(), self._phase_timed_out, (phase,)
            )
            timer.daemon = True
            timer.start()

    def _phase_timed_out(self, phase: str) -> None:
        if self._stop_mode == phase and self._inflight:
            log.warning("%s shutdown timed out with a task running; stopping it", phase)
            self._interrupt_pending = True
            # A real signal: it also interrupts a blocking call in the task.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGQUIT)

    def _next_phase(self, signum: int) -> str:
        quit_signal = signum == getattr(signal, "SIGQUIT", None) or (
            signum == signal.SIGTERM and os.environ.get("REMAP_SIGTERM") == "SIGQUIT"
        )
        soft = self.app.conf.worker_soft_shutdown_timeout > 0
        current = self._stop_mode
        if current is None and not quit_signal:
            return "warm"
        if current in (None, "warm") and soft:
            return "soft"
        return "cold"

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._interrupt_pending:  # our own timer: the phase's time ran out
            self._interrupt_pending = False
            phase = "cold"
        else:
            phase = self._next_phase(signum)
        if phase == "warm":
            log.warning(
                "%s: warm shutdown, finishing %d running task(s) (at most %ss); send it "
                "again to stop sooner",
                name,
                len(self._inflight),
                self.app.conf.worker_shutdown_timeout,
            )
        elif phase == "soft":
            log.warning(
                "%s: soft shutdown, %d running task(s) get %ss more, then go back to the "
                "queue; send it again for a cold shutdown",
                name,
                len(self._inflight),
                self.app.conf.worker_soft_shutdown_timeout,
            )
        else:
            log.warning("%s: cold shutdown, unfinished tasks go back to the queue", name)
        first_cold = phase == "cold" and self._stop_mode != "cold"
        self.stop(phase=phase)
        if first_cold and self.pool_name == "solo" and self._inflight:
            raise ColdShutdown()

    def _install_signals(self) -> None:
        if (
            not self.install_signal_handlers
            or threading.current_thread() is not threading.main_thread()
        ):
            return
        for name in ("SIGTERM", "SIGINT", "SIGQUIT"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._on_signal)
        self._signals_installed = True

    # ----------------------------------------------------------------- start / run

    def banner(self) -> str:
        conf = self.app.conf
        plugins = [p.name for p in self.app.plugins.describe() if not p.builtin]
        lines = [
            f"kernel worker {self.hostname}",
            f"  app:         {self.app.main or '__main__'} ({len(self.app.tasks)} tasks)",
            f"  broker:      {_redact(conf.broker_url)}{self._sqlite_note(conf.broker_url)}",
            f"  results:     {_redact(conf.result_backend or 'disabled')}"
            f"{self._sqlite_note(conf.result_backend or '')}",
            f"  pool:        {self.pool_name} (concurrency {self.concurrency})",
            f"  queues:      {', '.join(self.queue_names)}",
            f"  plugins:     {', '.join(plugins) or 'builtins only'}",
        ]
        tasks = sorted(self.app.tasks)
        if tasks:
            lines.append("  tasks:       " + "\n               ".join(tasks))
        return "\n".join(lines)

    @staticmethod
    def _sqlite_note(url: str) -> str:
        if not url.startswith("sqlite:"):
            return ""
        from kernel.plugins.builtin.sqlite_db import path_from_url

        return f"  (file {os.path.abspath(path_from_url(url))})"

    def _component_order(self) -> list[Any]:
        """Plugin components in an order that honours ``requires``; checked before start."""
        pending = {spec.name: spec for spec in self.app.plugins.specs("worker_components")}
        started: set[str] = {"pool", "consumer"}
        order = []
        while pending:
            ready = sorted(n for n, s in pending.items() if set(s.requires) <= started)
            if not ready:
                missing = {n: sorted(set(s.requires) - started) for n, s in pending.items()}
                raise ConfigurationError(
                    f"worker components with unmet requirements: {missing}; install the "
                    "plugins that provide them or remove the components' plugins"
                )
            for name in ready:
                order.append(pending.pop(name))
                started.add(name)
        return order

    def _start_components(self, order: list[Any]) -> None:
        for spec in order:
            component = spec.load()(self)
            component.start()
            self._components.append(component)

    def start(self) -> None:
        """Run until stopped; returns after the shutdown finished."""
        components = self._component_order()
        self._install_signals()
        self.pool = self.pool_spec.load()(self, self.concurrency)
        self.pool.start()
        connection = self.app.connection()
        self._broker_errors = broker_connection_errors(connection)
        if "redelivery_on_close" in self.app.broker_features():
            # A broker that takes back a closed channel's messages (AMQP) may close the
            # consumer's channel on its own: survived like a lost connection.
            self._channel_errors = tuple(connection.channel_errors)
        try:
            connected = self._connect(connection)
        except BaseException:
            self._abandon_start(connection)
            raise
        if not connected:  # asked to stop while waiting for the broker
            self._abandon_start(connection)
            return
        channel = connection.channel()
        self._producer = connection.Producer(channel)
        queues = self.app.queues_for(self.queue_names)
        accept = self.app.serialization.accepted_types(self.app.conf.accept_content)
        consumer = Consumer(
            channel,
            queues=queues,
            callbacks=[self._on_message],
            accept=accept,
            on_decode_error=self._on_decode_error,
            prefetch_count=self.prefetch_count or None,
        )
        consumer.consume()
        self._consumer = consumer
        self._start_control()
        self._start_components(components)
        self.app.plugins.hook.kernel_worker_ready(worker=self)
        log.info(
            "worker %s ready: pool %s x%d, queues %s",
            self.hostname,
            self.pool_name,
            self.concurrency,
            ",".join(self.queue_names),
        )
        self.ready.set()
        cold = False
        try:
            self._run(connection)
            cold = self._stop_mode == "cold"
            if not cold:
                self._cancel_consumer()
                cold = not self._drain_inflight()
        except ColdShutdown:
            cold = True
        except BrokerConnectionError as exc:
            log.error("%s", exc)
            cold = True
            raise
        except BaseException as exc:
            log.exception(
                "worker %s failed with task(s) %s running; stopping at once, unfinished "
                "messages go back to the queue",
                self.hostname,
                ", ".join(f"{d.name}[{d.id}]" for _m, d in self._inflight.values()) or "none",
            )
            cold = True
            self._crash = exc  # _shutdown requeues what is left once the pool stopped
            raise
        finally:
            self._shutdown(connection, cold)

    def _abandon_start(self, connection: Any) -> None:
        """Undo a start that never reached the broker: nothing was received."""
        assert self.pool is not None
        self.pool.stop()
        try:
            connection.collect()
        except Exception:
            log.debug("discarding the unconnected broker connection failed", exc_info=True)
        self.revoked.close()
        self.app.close()
        self.stopped.set()
        log.info("worker %s stopped before it connected to the broker", self.hostname)

    def _start_control(self) -> None:
        """Listen for broadcast commands (revoke, rate_limit, ping) on a connection of
        their own, polled every ``control_poll`` seconds: on polling transports, a
        second queue on the task connection would cost a query for every task."""
        from kernel.worker.control import ControlNode

        try:
            self._control_connection = self.app.connection()
            self._control = ControlNode(self)
            self._control_connection.ensure_connection(max_retries=0)
            self._control.start(self._control_connection)
        except self._broker_errors as exc:  # the broker just answered: try again soon
            self._control_failed(exc)
        except Exception:
            log.exception(
                "remote control is unavailable on this broker (revoke broadcasts will not "
                "reach worker %s); tasks still run",
                self.hostname,
            )
            self._control = None

    def _run(self, connection: Any) -> None:
        while self._stop_mode is None:
            if self._broker_down:
                self._reconnect(connection)
            else:
                try:
                    self._step(connection)
                except self._broker_errors as exc:
                    self._connection_lost(exc)
                except self._channel_errors as exc:
                    self._channel_lost(connection, exc)
            if time.monotonic() >= self._next_control_poll:
                self._poll_control()

    def _step(self, connection: Any) -> None:
        """One turn of the loop: settle, dispatch, then receive (or wait for a slot)."""
        assert self.pool is not None
        self._complete_finished()
        recovering = self._outage_since is not None
        if not recovering:  # nothing new starts until the broker answers again
            self._release_waiting()
            self._dispatch()
            if self.autoscaler is not None:
                self.autoscaler.maybe_scale(len(self._reserved), len(self._inflight))
        if self._broker_down:  # an acknowledgement just failed
            return
        if not recovering and self._slot_bound():
            # Slot-bound: work is waiting and every slot is busy, so the next thing
            # that matters is a task finishing; wait for exactly that event, and
            # look at the broker (remote control: revoke, terminate) in between.
            self._keep_heartbeats(connection)
            self._wait_completion(self._until_next_release(self.control_poll))
            return
        timeout = self.busy_poll if self._inflight else self.idle_poll
        try:
            connection.drain_events(timeout=self._until_next_release(timeout))
        except TimeoutError:
            pass
        if recovering and not self._broker_down:
            self._resumed()

    def _drain_inflight(self) -> bool:
        """Warm or soft shutdown: wait for running tasks; False when the phase timed out.

        Jobs queued in the pool that no process has begun are cancelled first: their
        messages go back to the broker with the reserved ones."""
        for tag, handle in list(self._handles.items()):
            entry = self._inflight.get(tag)
            # One acknowledged when dispatched (acks_late=False) cannot go back: it runs.
            if handle is not None and entry is not None and not entry[0].acknowledged:
                handle.cancel()
        while self._inflight and self._stop_mode != "cold":
            if time.monotonic() >= self._phase_deadline:
                log.warning(
                    "%s shutdown timed out with %d task(s) running; stopping them, "
                    "their messages return to the queue",
                    self._stop_mode,
                    len(self._inflight),
                )
                return False
            self._wait_completion(0.1)
        return self._stop_mode != "cold"

    def _shutdown(self, connection: Any, cold: bool) -> None:
        consumer = self._consumer
        channel = consumer.channel
        if self._control is not None:
            try:
                self._control.stop()
            except Exception:
                log.debug("stopping the remote-control node failed", exc_info=True)
        if self._control_connection is not None:
            try:
                self._control_connection.release()
            except Exception:
                log.debug("closing the remote-control connection failed", exc_info=True)
        for component in reversed(self._components):
            try:
                component.stop()
            except Exception:
                log.exception("worker component %r failed to stop", component)
        if self.pool is not None:
            if cold and self._inflight and "terminate" not in self.pool_spec.supports:
                log.warning(
                    "pool %s cannot stop running tasks; waiting for %d of them to finish "
                    "(SIGKILL abandons them: their messages come back after the broker's "
                    "visibility timeout)",
                    self.pool_name,
                    len(self._inflight),
                )
            if cold:
                self.pool.terminate()
            else:
                self.pool.stop()
        self._complete_finished(cold_shutdown=cold)
        if self._crash is not None:
            # The running tasks may be what broke the worker (a task raising SystemExit
            # in a solo pool): count this as a delivery so it cannot loop for ever. Only
            # now, with the pool stopped, so no copy runs while the task still runs.
            for message, decoded in list(self._inflight.values()):
                if not message.acknowledged:
                    try:
                        self._requeue(message, decoded, f"its worker stopped ({self._crash!r})")
                    except Exception:
                        log.exception("could not requeue %s; the broker returns it", decoded.id)
            self._inflight.clear()
        if self._unsettled and not self._broker_down:
            self._settle_unsettled()  # a last try: the broker may be back
        if self._unsettled:
            log.warning(
                "%d finished task(s) could not be acknowledged (broker unreachable); the "
                "broker delivers their messages again",
                len(self._unsettled),
            )
        returned = (
            len(self._reserved) + len(self._scheduled) + len(self.rate_limits) + len(self._inflight)
        )
        try:
            consumer.cancel()
        except Exception:
            log.debug("cancelling the consumer failed during shutdown", exc_info=True)
        # Closing the channel hands unacknowledged messages back to the broker.
        try:
            channel.close()
        except Exception as exc:
            log.warning(
                "could not close the broker channel (%s); unacknowledged messages go back "
                "to the queue when the broker notices (connection loss or visibility "
                "timeout)",
                _describe(exc),
            )
        try:
            connection.release()
        except Exception:
            log.debug("closing the broker connection failed", exc_info=True)
        if returned:
            log.info("returned %d unfinished message(s) to the broker", returned)
        self.revoked.close()
        self.app.plugins.hook.kernel_worker_shutdown(worker=self)
        self.app.close()
        self.stopped.set()
        log.info("worker %s stopped (%s shutdown)", self.hostname, "cold" if cold else "warm")

    @staticmethod
    def _keep_heartbeats(connection: Any) -> None:
        """With AMQP heartbeats on, the broker drops a connection that neither sends nor
        reads for twice the interval: while every slot is busy, read what arrived (the
        prefetch window is full, so mostly heartbeats) and send ours when due. The
        interval is the one negotiated with the broker (set through the transport's
        ``heartbeat`` option, which kombu's own ``Connection.heartbeat`` does not show)."""
        try:
            interval = connection.get_heartbeat_interval()
        except Exception:  # a transport without heartbeats
            interval = 0
        if not interval:
            return
        try:
            connection.drain_events(timeout=0)
        except TimeoutError:
            pass
        connection.heartbeat_check()

    # ----------------------------------------------------------------- receiving

    def _on_decode_error(self, message: Any, exc: BaseException) -> None:
        if isinstance(exc, ContentDisallowed) or type(exc).__name__ == "ContentDisallowed":
            reason = (
                f"content type {message.content_type!r} is not accepted "
                f"(accept_content={self.app.conf.accept_content}); add it if the "
                "producer is trusted"
            )
        else:
            reason = f"body could not be decoded: {type(exc).__name__}: {exc}"
        headers = message.headers or {}
        task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
        self._reject_bad(message, reason, task_id, ContentDisallowed(reason) if task_id else None)

    def _reject_bad(
        self,
        message: Any,
        reason: str,
        task_id: str | None = None,
        exc: BaseException | None = None,
    ) -> None:
        headers = message.headers or {}
        task_id = task_id or headers.get("id")
        log.error(
            "rejected message %s (task %s): %s; moved to queue %s",
            task_id or "?",
            headers.get("task", "?"),
            reason,
            self.app.conf.task_dead_letter_queue,
        )
        if task_id and exc is not None:
            try:
                self.app.backend.mark_as_failure(task_id, exc)
            except Exception:
                log.exception("could not store the failure of %s", task_id)
        self._dead_letter(message, reason)

    def _dead_letter(self, message: Any, reason: str) -> None:
        queue_name = self.app.conf.task_dead_letter_queue
        headers = dict(message.headers or {})
        headers[DEAD_LETTER_REASON_HEADER] = reason
        try:
            self._producer.publish(
                message.body,
                routing_key=queue_name,
                exchange="",
                content_type=message.content_type or "application/octet-stream",
                content_encoding=message.content_encoding or "binary",
                headers=headers,
                declare=[Queue(queue_name)],
                **{
                    k: v
                    for k, v in (message.properties or {}).items()
                    if k in ("correlation_id", "reply_to", "priority")
                },
            )
        except Exception:
            log.exception("could not dead-letter a message; it stays in its queue")
            self._reject(message)
            return
        self.counts["dead_lettered"] += 1
        self._ack(message)

    def _on_message(self, body: Any, message: Any) -> None:
        try:
            self._receive(body, message)
        except Exception:  # a failure here must not stop the worker, nor lose the message
            headers = message.headers or {}
            log.exception(
                "could not take task %s[%s]; returning it to the queue",
                headers.get("task", "?"),
                headers.get("id", "?"),
            )
            if not message.acknowledged:
                self._reject(message)

    def _receive(self, body: Any, message: Any) -> None:
        try:
            decoded = decode_task(message.headers, message.properties, body)
        except ProtocolError as exc:
            self._reject_bad(message, str(exc))
            return
        except Exception as exc:  # a bad message must never stop the worker
            self._reject_bad(message, f"message could not be read: {type(exc).__name__}: {exc}")
            return
        if decoded.name not in self.app.tasks:
            error = NotRegistered(
                f"task {decoded.name!r} is not registered on worker {self.hostname}; "
                "start the worker with the app that defines it (-A) or add its module "
                "to include=[...]"
            )
            self._reject_bad(message, str(error), decoded.id, error)
            self._chord_member_failed(message, decoded, error)
            return
        max_deliveries = self.app.conf.task_max_deliveries
        if max_deliveries and decoded.delivery_count >= max_deliveries:
            error = WorkerLostError(
                f"task {decoded.name}[{decoded.id}] was delivered {decoded.delivery_count} "
                "times without finishing (its worker died, it was requeued after an error, "
                f"or it rejected itself with requeue=True); task_max_deliveries="
                f"{max_deliveries}; its message is in queue "
                f"{self.app.conf.task_dead_letter_queue}"
            )
            self._reject_bad(message, str(error), decoded.id, error)
            self._chord_member_failed(message, decoded, error)
            return
        if decoded.id in self.revoked:
            self._discard_revoked(message, decoded)
            return
        if self._expired(message, decoded):
            return
        if decoded.eta is not None:
            delay = decoded.eta.timestamp() - time.time()
            if delay > 0:
                heapq.heappush(
                    self._scheduled,
                    (decoded.eta.timestamp(), next(self._sequence), message, decoded),
                )
                self._update_prefetch()
                return
        self._reserved.append((message, decoded))

    def _until_next_release(self, limit: float) -> float:
        """Seconds to wait at most before a held message (ETA, rate limit) is due."""
        if self._scheduled:
            limit = min(limit, self._scheduled[0][0] - time.time())
        if len(self.rate_limits) and self.pool and len(self._inflight) < self.pool.limit:
            limit = min(limit, self.rate_limits.next_release() or 0.0)
        return max(0.0, limit)

    def _update_prefetch(self) -> None:
        """Held messages (waiting for their ETA or a rate-limit token) do not count
        against the prefetch window, as in Celery, or enough of them would stop the
        worker receiving other work; up to ``held_limit`` of them."""
        if not self.prefetch_count:
            return
        held = min(len(self._scheduled) + len(self.rate_limits), self.held_limit)
        if held != self._held:
            self._held = held
            self._consumer.qos(prefetch_count=self.prefetch_count + held)

    def pool_resized(self) -> None:
        """Autoscale changed the pool: the prefetch window follows its size."""
        assert self.pool is not None
        self.prefetch_count = self.pool.limit * self.prefetch_multiplier
        if self.prefetch_count:
            self._consumer.qos(prefetch_count=self.prefetch_count + self._held)

    def _expired(self, message: Any, decoded: DecodedTask) -> bool:
        """Revoke (and ack) a task past its ``expires``; checked on receipt, on dispatch,
        and by a prefork child about to begin a job that waited in the pool."""
        if decoded.expires is None or decoded.expires > datetime.now(timezone.utc):
            return False
        log.warning(
            "task %s[%s] expired at %s; not run",
            decoded.name,
            decoded.id,
            decoded.expires.isoformat(),
        )
        self._mark_revoked(message, decoded, "expired")
        self._ack(message)
        return True

    def _mark_revoked(
        self, message: Any, decoded: DecodedTask, reason: str, terminated: bool = False
    ) -> None:
        self.counts["revoked"] += 1
        try:
            self.app.backend.mark_as_revoked(
                decoded.id,
                reason,
                request=context_for(decoded, self.hostname, message.delivery_info),
            )
        except Exception:  # the message is still acknowledged: the task must not run
            log.exception(
                "task %s[%s] was not run (%s) but its REVOKED state could not be stored",
                decoded.name,
                decoded.id,
                reason,
            )
        request = context_for(decoded, self.hostname, message.delivery_info)
        if request.chord:  # a revoked header task still counts: its chord fails
            chord_part_return(self.app, request, states.REVOKED, TaskRevokedError(reason))
        call_hook_safely(
            self.app.plugins.hook.kernel_task_revoked,
            task=self.app.tasks[decoded.name],
            request=request,
            terminated=terminated,
            expired=reason == "expired",
        )

    def _chord_member_failed(
        self, message: Any, decoded: DecodedTask, error: BaseException
    ) -> None:
        """A chord header task failed outside ``execute`` (dead-lettered, its process
        lost): the chord must still learn of it, or its body would wait for ever."""
        if decoded.embed.get("chord"):
            context = context_for(decoded, self.hostname, message.delivery_info)
            chord_part_return(self.app, context, states.FAILURE, error)

    def _discard_revoked(self, message: Any, decoded: DecodedTask) -> None:
        log.info("task %s[%s] was revoked; not run", decoded.name, decoded.id)
        self._mark_revoked(message, decoded, "revoked")
        self._ack(message)

    def _release_waiting(self) -> None:
        """Move held messages whose ETA came or whose rate-limit token arrived."""
        now = time.time()
        released = False
        while self._scheduled and self._scheduled[0][0] <= now:
            _, _, message, decoded = heapq.heappop(self._scheduled)
            self._reserved.append((message, decoded))
            released = True
        if len(self.rate_limits):
            assert self.pool is not None
            free = self.pool.limit - len(self._inflight)
            for message, decoded in self.rate_limits.release(free):
                released = True
                if decoded.id in self.revoked:
                    self._discard_revoked(message, decoded)
                elif not self._expired(message, decoded):
                    self._dispatch_one(message, decoded)
        if released:
            self._update_prefetch()

    # ----------------------------------------------------------------- revocation

    def revoke_tasks(
        self, task_ids: list[str], terminate: bool = False, signum: Any = None
    ) -> list:
        """Revoke ``task_ids`` (remote control): waiting ones are dropped now, running
        ones are stopped with ``signum`` when ``terminate``; returns the ids found here.

        Every id is remembered (and saved with ``--statedb``) so a message that
        arrives later is not run either.
        """
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        self.revoked.add(ids)
        self._complete_finished()  # a finished task's child may already run another
        wanted = set(ids)
        found: list[str] = []

        def match(item: tuple[Any, DecodedTask]) -> bool:
            return item[1].id in wanted

        waiting = [item for item in self._reserved if match(item)]
        if waiting:
            self._reserved = deque(item for item in self._reserved if not match(item))
        scheduled = [(m, d) for _, _, m, d in self._scheduled if d.id in wanted]
        if scheduled:
            self._scheduled = [entry for entry in self._scheduled if entry[3].id not in wanted]
            heapq.heapify(self._scheduled)
        waiting += scheduled + self.rate_limits.remove(match)
        for message, decoded in waiting:
            self._discard_revoked(message, decoded)
            found.append(decoded.id)
        if waiting:
            self._update_prefetch()
        signum = _signal_number(signum)
        for tag, (_message, decoded) in list(self._inflight.items()):
            if decoded.id not in wanted:
                continue
            found.append(decoded.id)
            handle = self._handles.get(tag)
            if not terminate:
                if handle is not None and handle.cancel():
                    log.info(
                        "task %s[%s] revoked; it is not run unless it already began",
                        decoded.name,
                        decoded.id,
                    )
                    continue
                log.info(
                    "task %s[%s] revoked while running; it finishes (use terminate=True "
                    "to stop it)",
                    decoded.name,
                    decoded.id,
                )
                continue
            if handle is None or not handle.terminate(signum):
                log.warning(
                    "task %s[%s]: pool %s cannot terminate a running task; it finishes",
                    decoded.name,
                    decoded.id,
                    self.pool_name,
                )
                continue
            self._terminating[tag] = signum
            log.warning(
                "task %s[%s] terminated with %s by a revoke",
                decoded.name,
                decoded.id,
                signal.Signals(signum).name,
            )
        return found

    # ----------------------------------------------------------------- running

    def _dispatch(self) -> None:
        assert self.pool is not None
        while (
            self._reserved
            and self._stop_mode is None
            and not self._broker_down
            and self._pool_takes(self._reserved[0][1])
        ):
            message, decoded = self._reserved.popleft()
            if decoded.id in self.revoked:
                self._discard_revoked(message, decoded)
                continue
            if self._expired(message, decoded):
                continue
            if not self.rate_limits.admit(decoded.name, (message, decoded)):
                self._update_prefetch()  # waits for a token; other types go on
                continue
            self._dispatch_one(message, decoded)

    def _pool_takes(self, decoded: DecodedTask) -> bool:
        """Whether the pool takes this task now: a process is free, or the pool queues
        it ahead (the prefork look-ahead, ``Pool.capacity``). Never ahead: one
        acknowledged when dispatched (``acks_late=False``), which a cold shutdown
        would lose unstarted, nor one with a rate limit, whose token is taken at
        dispatch, so queued ones would start back to back, above the rate."""
        assert self.pool is not None
        held = len(self._inflight)
        if held < self.pool.limit:
            return True
        if held >= self.pool.capacity:
            return False
        task = self.app.tasks.get(decoded.name)
        return (
            task is not None
            and bool(task.option("acks_late"))
            and not self.rate_limits.limited(decoded.name)
        )

    def _slot_bound(self) -> bool:
        """Work is reserved and the pool takes none of it now: what matters next is a
        task finishing."""
        return bool(self._reserved) and not self._pool_takes(self._reserved[0][1])

    def _dispatch_one(self, message: Any, decoded: DecodedTask) -> None:
        assert self.pool is not None
        task = self.app.tasks[decoded.name]
        if not task.option("acks_late"):
            try:
                if self._broker_down:
                    raise self._broker_error or OperationalError("broker unreachable")
                message.ack()
            except self._broker_errors as exc:  # not taken: it waits for the broker
                self._reserved.appendleft((message, decoded))
                self._connection_lost(exc)
                return
        tag = message.delivery_tag
        self._inflight[tag] = (message, decoded)
        soft, hard = self._time_limits(task, decoded)
        job = Job(decoded, self.hostname, dict(message.delivery_info or {}), soft, hard)
        self._handles[tag] = self.pool.apply(
            job, lambda outcome, error, tag=tag: self._completed.put((tag, outcome, error))
        )
        self._complete_finished()

    def _time_limits(self, task: Any, decoded: DecodedTask) -> tuple[Any, Any]:
        """(soft, hard) seconds: the message's ``timelimit`` header, then the task's
        options, then the worker's defaults (``--soft-time-limit``/``--time-limit``)."""
        conf = self.app.conf
        hard, soft = (list(decoded.time_limits or ()) + [None, None])[:2]
        if soft is None:
            soft = task.soft_time_limit or conf.task_soft_time_limit
        if hard is None:
            hard = task.time_limit or conf.task_time_limit
        return soft or None, hard or None

    def _wait_completion(self, timeout: float) -> None:
        try:
            item = self._completed.get(timeout=timeout)
        except queue_module.Empty:
            return
        self._complete_batch(item)

    def _complete_finished(self, cold_shutdown: bool = False) -> None:
        try:
            item = self._completed.get_nowait()
        except queue_module.Empty:  # most turns: nothing finished
            return
        self._complete_batch(item, cold_shutdown)

    def _complete_batch(self, item: Any, cold_shutdown: bool = False) -> None:
        """Settle ``item`` and every completion queued behind it, their
        acknowledgements in one batch where the transport batches."""
        with self._batched_acks():
            while item is not None:
                tag, outcome, error = item
                # On a cold shutdown, a task stopped by us goes back when the channel
                # closes, uncounted; one that never started is settled as usual.
                if not cold_shutdown or error is None or isinstance(error, NotStarted):
                    self._complete(tag, outcome, error)
                try:
                    item = self._completed.get_nowait()
                except queue_module.Empty:
                    item = None

    def _batched_acks(self) -> Any:
        """The channel's ``batched_acks()`` where the transport has one (Redis: the
        acknowledgements of every task finished since the last turn in one round
        trip), else nothing."""
        channel = getattr(self._consumer, "channel", None)
        batched = getattr(channel, "batched_acks", None)
        return batched() if batched is not None else contextlib.nullcontext()

    def _complete(self, tag: str, outcome: Any, error: BaseException | None) -> None:
        entry = self._inflight.pop(tag, None)
        self._handles.pop(tag, None)
        terminated_with = self._terminating.pop(tag, None)
        if entry is None:  # already returned to the broker by a failing shutdown
            return
        message, decoded = entry
        if isinstance(error, NotStarted):  # given back by the pool before it began
            if decoded.id in self.revoked:
                self._discard_revoked(message, decoded)
            elif not self._expired(message, decoded):  # a warm shutdown took it back
                self._reserved.appendleft((message, decoded))  # returned unstarted
            return
        if terminated_with is not None and error is not None:
            error = Terminated(terminated_with)
        elif isinstance(error, Terminated):  # its child was signalled for another task
            error = WorkerLostError(f"its process was terminated ({error!r})")
        try:
            self._settle(message, decoded, outcome, error)
        except Exception:
            log.exception(
                "task %s[%s]: could not settle its message; returning it to the queue",
                decoded.name,
                decoded.id,
            )
            if not message.acknowledged:
                self._reject(message)

    def _settle(
        self, message: Any, decoded: DecodedTask, outcome: Any, error: BaseException | None
    ) -> None:
        """Ack, requeue or fail one finished message, in the worker's thread."""
        if error is not None:
            self._on_lost(message, decoded, error)
            return
        if outcome.state == states.SUCCESS:
            self.counts["succeeded"] += 1
            log.info(
                "task %s[%s] succeeded in %.3fs: %s",
                outcome.name,
                outcome.task_id,
                outcome.runtime,
                outcome.summary,
            )
        elif outcome.state == states.FAILURE:
            self.counts["failed"] += 1
        if message.acknowledged:
            if outcome.requeue:  # acks_late=False: the message is gone, say so
                log.error(
                    "task %s[%s] was acknowledged before it ran (acks_late=False) and its "
                    "result could not be stored; it is lost. Use acks_late=True to have it "
                    "retried when that happens",
                    decoded.name,
                    decoded.id,
                )
            return
        if outcome.requeue:
            self._requeue(message, decoded, f"requeued ({outcome.summary})")
        elif outcome.reject:
            self._dead_letter(message, "the task rejected its message (Reject, requeue=False)")
        else:
            self._ack(message)

    def _on_lost(self, message: Any, decoded: DecodedTask, error: BaseException) -> None:
        if isinstance(error, Terminated):  # a revoke with terminate=True killed it
            self._mark_revoked(message, decoded, "terminated", terminated=True)
            if not message.acknowledged:
                self._ack(message)
            return
        if isinstance(error, TimeLimitExceeded):  # billiard killed the child
            self._on_hard_time_limit(message, decoded, error)
            return
        requeue = self.app.tasks[decoded.name].option("reject_on_worker_lost")
        if message.acknowledged or not requeue:
            lost = WorkerLostError(
                f"task {decoded.name}[{decoded.id}]: the process running it died ({error})"
            )
            log.error("%s; marked FAILURE", lost)
            self.app.backend.mark_as_failure(
                decoded.id,
                lost,
                request=context_for(decoded, self.hostname, message.delivery_info),
            )
            self._chord_member_failed(message, decoded, lost)
            self.counts["failed"] += 1
            if not message.acknowledged:
                self._ack(message)
            return
        if isinstance(error, WorkerLostError):
            reason = f"the process running it died ({error})"
        else:  # the task ran, but storing or reporting its outcome failed
            reason = f"it could not finish ({type(error).__name__}: {error})"
        self._requeue(message, decoded, reason)

    def _on_hard_time_limit(self, message: Any, decoded: DecodedTask, error: BaseException) -> None:
        """The task ran past its hard limit and the pool stopped it (prefork kills and
        replaces its process; gevent stops its greenlet): it failed."""
        task = self.app.tasks[decoded.name]
        limit = error.args[0] if error.args else None
        exc = TimeLimitExceeded(limit)
        log.error(
            "task %s[%s]: hard time limit (%ss) exceeded; the pool stopped it",
            decoded.name,
            decoded.id,
            limit,
        )
        context = context_for(decoded, self.hostname, message.delivery_info)
        text = f"TimeLimitExceeded: task {decoded.name}[{decoded.id}] ran past {limit}s\n"
        record_failure(task, context, exc, text, self.app.backend)
        if context.chord:
            chord_part_return(self.app, context, states.FAILURE, exc)
        self.counts["failed"] += 1
        if not message.acknowledged:
            self._ack(message)

    def _requeue(self, message: Any, decoded: DecodedTask, reason: str) -> None:
        """Return a message for another attempt, counted against ``task_max_deliveries``."""
        attempt = decoded.delivery_count + 1
        log.warning(
            "task %s[%s]: %s; returning it to the queue (delivery %d of at most %d)",
            decoded.name,
            decoded.id,
            reason,
            attempt,
            self.app.conf.task_max_deliveries,
        )
        self.counts["requeued"] += 1
        if "delivery_count" in self.features or self._broker_down:
            self._reject(message)
            return
        # The transport does not count deliveries: republish a copy that carries the count.
        # It goes back to the queue it came from only (the default exchange routes by
        # queue name): through its exchange, a fanout or an overlapping topic binding
        # would copy it into every other bound queue.
        headers = dict(message.headers or {})
        headers[DELIVERY_COUNT_HEADER] = attempt
        info = message.delivery_info or {}
        queue = self._queue_of(message)
        exchange, routing_key = (
            ("", queue) if queue else (info.get("exchange", ""), info.get("routing_key", ""))
        )
        try:
            self._producer.publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                headers=headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                **{
                    k: v
                    for k, v in (message.properties or {}).items()
                    if k in ("correlation_id", "reply_to", "priority")
                },
            )
        except self._broker_errors as exc:  # return the message itself, uncounted
            self._connection_lost(exc)
            self._reject(message)
            return
        self._ack(message)

    def _queue_of(self, message: Any) -> str | None:
        """The queue ``message`` was consumed from: ``delivery_info["queue"]`` when the
        transport sets it, else found by its consumer tag; None if unknown."""
        info = message.delivery_info or {}
        if info.get("queue"):
            return str(info["queue"])
        tag = info.get("consumer_tag")
        active = getattr(self._consumer, "_active_tags", None) or {}
        for queue, consumer_tag in active.items():
            if consumer_tag == tag:
                return str(queue)
        return None

    def stats(self) -> dict:
        return {
            "hostname": self.hostname,
            "pid": os.getpid(),
            "pool": self.pool.info() if self.pool else None,
            "queues": list(self.queue_names),
            "autoscale": self.autoscaler.info() if self.autoscaler else None,
            "reserved": len(self._reserved),
            "running": len(self._inflight),
            "scheduled": len(self._scheduled),
            "rate_limited": len(self.rate_limits),
            "revoked": len(self.revoked),
            "counts": dict(self.counts),
        }


def _signal_number(value: Any) -> int:
    """``"SIGKILL"``, ``"KILL"``, 9 or None (SIGTERM) -> a signal number; clear error else."""
    if value is None:
        return int(signal.SIGTERM)
    if isinstance(value, int):
        return int(signal.Signals(value))
    name = str(value).upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {value!r}; use a name like SIGTERM or SIGKILL") from None
