"""Running one task: context, hooks, result storing, callbacks.

Runs wherever the pool runs the task (the worker's thread, a thread of the
``threads`` pool, a ``prefork`` child) and in eager mode. The worker's main loop only
sees the :class:`Outcome`, which decides how the message is acknowledged.
"""

from __future__ import annotations

import inspect
import logging
import reprlib
import threading
import time
import traceback as traceback_module
from typing import Any

import attrs

from kernel import states
from kernel.backends import document
from kernel.canvas import maybe_signature
from kernel.exceptions import Ignore, Reject, Retry, Terminated
from kernel.protocol import DecodedTask
from kernel.task import Context, Task, running_as

log = logging.getLogger(__name__)


@attrs.frozen
class Outcome:
    """How a task ended, as the worker's main loop needs to know it."""

    task_id: str
    name: str
    state: str
    runtime: float
    summary: str = ""
    requeue: bool = False
    reject: bool = False


@attrs.define
class ExecutionRequest:
    """What ``kernel_task_execute`` wrappers receive: the task, its context, a runner."""

    task: Task
    context: Context

    @property
    def id(self) -> str | None:
        return self.context.id

    @property
    def name(self) -> str:
        return self.task.name

    def run(self) -> Any:
        return self.task.run_with_context(self.context)


def context_for(
    decoded: DecodedTask, hostname: str | None, delivery_info: dict | None, eager: bool = False
) -> Context:
    return Context(
        id=decoded.id,
        task=decoded.name,
        args=decoded.args,
        kwargs=decoded.kwargs,
        retries=decoded.retries,
        is_eager=eager,
        called_directly=False,
        eta=decoded.eta,
        expires=decoded.expires,
        hostname=hostname,
        delivery_info=dict(delivery_info or {}),
        reply_to=decoded.reply_to,
        correlation_id=decoded.id,
        root_id=decoded.root_id,
        parent_id=decoded.parent_id,
        group=decoded.group_id,
        origin=decoded.origin,
        timelimit=decoded.time_limits,
        headers=decoded.headers,
        callbacks=decoded.callbacks,
        errbacks=decoded.errbacks,
        chain=decoded.chain,
        chord=decoded.embed.get("chord"),
        group_index=decoded.headers.get("group_index"),
        ignore_result=decoded.ignore_result,
        delivery_count=decoded.delivery_count,
    )


def execute(task: Task, context: Context, *, store: bool = True) -> tuple[Outcome, dict]:
    """Run ``task`` in ``context``; store its result; return (outcome, result document)."""
    app = task.app
    hook = app.plugins.hook
    backend = app.backend if store else None
    ignore = context.ignore_result or bool(task.option("ignore_result"))
    started = time.monotonic()
    if backend is not None and not ignore and task.option("track_started"):
        backend.mark_as_started(context.id, {"hostname": context.hostname}, request=context)
    call_hook_safely(
        hook.kernel_task_prerun,
        task=task,
        task_id=context.id,
        args=context.args,
        kwargs=context.kwargs,
        request=context,
    )
    state = states.SUCCESS
    retval: Any = None
    meta: dict = {}
    requeue = reject = False
    guard = _interrupt_guard()
    try:
        guard.arm()
        try:
            retval = hook.kernel_task_execute(request=ExecutionRequest(task, context))
        finally:
            # Past this point a time limit or terminate must not interrupt the
            # bookkeeping: the task ran, its outcome is recorded once.
            guard.disarm()
    except Reject as exc:
        state, reject, requeue = states.REJECTED, True, exc.requeue
        log.warning(
            "task %s[%s] rejected itself: %s (requeue=%s)",
            task.name,
            context.id,
            exc.reason,
            exc.requeue,
        )
        meta = document.build(context.id, state, None)
    except Ignore:
        state = states.IGNORED
        meta = document.build(context.id, state, None)
    except Retry as exc:  # task.retry() stored the RETRY state before sending the retry
        state = states.RETRY
        log.info("task %s[%s] will retry: %s", task.name, context.id, exc)
    except Terminated:  # a revoke with terminate=True interrupted its thread
        state = states.REVOKED
        log.warning("task %s[%s] terminated by a revoke", task.name, context.id)
        if backend is not None:
            backend.mark_as_revoked(context.id, "terminated", request=context)
        call_hook_safely(
            hook.kernel_task_revoked, task=task, request=context, terminated=True, expired=False
        )
    except Exception as exc:  # SystemExit ends the process running it, as in Celery
        state = states.FAILURE
        retval = exc
        meta = record_failure(task, context, exc, traceback_module.format_exc(), backend)
    else:
        # Callbacks and the chain's next step go out before the result is stored, so
        # that the stored result lists them as children (as Celery does).
        with running_as(task, context):
            _send_callbacks(app, context, retval)
        if backend is not None and not ignore:
            meta = backend.mark_as_done(context.id, retval, request=context)
        else:
            meta = document.build(context.id, state, retval, children=context.children)
        call_hook_safely(hook.kernel_task_success, task=task, result=retval, request=context)
    if state in (states.SUCCESS, states.FAILURE, states.REVOKED) and context.chord:
        # A report that fails (result backend unreachable) is raised, not logged away:
        # the worker returns the message, and the task's next run reports again.
        chord_part_return(app, context, state, retval, backend, raise_errors=True)
    runtime = time.monotonic() - started
    call_hook_safely(
        hook.kernel_task_postrun,
        task=task,
        task_id=context.id,
        args=context.args,
        kwargs=context.kwargs,
        retval=retval,
        state=state,
        request=context,
    )
    summary = _summarise(retval)
    return Outcome(context.id, task.name, state, runtime, summary, requeue, reject), meta


class InterruptGuard:
    """Where a pool can interrupt a task (soft time limit, terminate): only while its
    body runs. Pools install one per thread with :func:`set_interrupt_guard`."""

    def arm(self) -> None:
        """The task body starts: interruptions may land from now on."""

    def disarm(self) -> None:
        """The body ended: no interruption may land after this returns."""


_NO_GUARD = InterruptGuard()
_guards = threading.local()


def set_interrupt_guard(guard: InterruptGuard | None) -> None:
    """Install ``guard`` for tasks run in this thread (None removes it)."""
    _guards.current = guard


def _interrupt_guard() -> InterruptGuard:
    return getattr(_guards, "current", None) or _NO_GUARD


def record_failure(
    task: Task, context: Context, exc: BaseException, text: str, backend: Any
) -> dict:
    """Store a task's failure, tell the plugins, send its errbacks; returns the document.

    Also used by the worker when the task's process was killed (hard time limit), so
    the task fails the same way as if it had raised.
    """
    app = task.app
    ignore = context.ignore_result or bool(task.option("ignore_result"))
    if backend is not None and (not ignore or app.conf.task_store_errors_even_if_ignored):
        meta = backend.mark_as_failure(context.id, exc, text, request=context)
    else:
        meta = document.build(context.id, states.FAILURE, exc, text)
    log.error(
        "task %s[%s] raised %s: %s",
        task.name,
        context.id,
        type(exc).__name__,
        exc,
        extra={"task_name": task.name, "task_id": context.id},
    )
    call_hook_safely(
        app.plugins.hook.kernel_task_failure,
        task=task,
        task_id=context.id,
        exception=exc,
        traceback=text,
        request=context,
    )
    run_errbacks(app, context, exc, text)
    _fail_chain(app, context, exc, text, backend)
    return meta


def chord_part_return(
    app: Any,
    context: Context,
    state: str,
    retval: Any,
    backend: Any = None,
    raise_errors: bool = False,
) -> None:
    """A chord header task ended: let the result backend count it (and fire the body).

    ``raise_errors``: raise when the backend fails, so that the caller can return the
    message for another attempt (backends count each header task once); otherwise
    the failure is logged.
    """
    backend = backend if backend is not None else app.backend
    try:
        backend.on_chord_part_return(context, state, retval)
    except Exception:
        if raise_errors:
            log.error(
                "task %s: could not report its end to chord %s; its message goes back "
                "to the queue so that it is reported again",
                context.id,
                context.group,
            )
            raise
        log.exception(
            "task %s: could not report its end to chord %s; the chord body may not run",
            context.id,
            context.group,
        )


def _fail_chain(app: Any, context: Context, exc: BaseException, text: str, backend: Any) -> None:
    """The steps after a failed task never run: they fail with the same exception."""
    if backend is None:
        return
    for raw in context.chain:
        step = maybe_signature(raw, app)
        step_id = step.options.get("task_id")
        if step_id:
            try:
                backend.mark_as_failure(step_id, exc, text)
            except Exception:
                log.exception("could not store the failure of chain step %s", step_id)


_summary_repr = reprlib.Repr()
_summary_repr.maxstring = _summary_repr.maxother = 200


def _summarise(value: Any) -> str:
    return _summary_repr.repr(value)


def call_hook_safely(hook_caller: Any, **kwargs: Any) -> None:
    """Lifecycle hooks after the task ran must not change its outcome; log their errors."""
    try:
        hook_caller(**kwargs)
    except Exception:
        log.exception(
            "plugin hook %s raised; the task's outcome is unchanged",
            getattr(hook_caller, "name", hook_caller),
        )


def _send_callbacks(app: Any, context: Context, retval: Any) -> None:
    """Send ``link`` callbacks and the chain's next step with the task's result.

    A step that cannot be sent raises: the task is then retried rather than the
    chain silently cut short.
    """
    lineage = {"parent_id": context.id, "root_id": context.root_id or context.id}
    for raw in context.callbacks:
        signature = maybe_signature(raw, app)
        try:
            if context.is_eager:
                signature.apply((retval,))
            else:
                signature.apply_async((retval,), **lineage)
        except Exception:
            log.exception("task %s: could not send callback %r", context.id, signature)
    if context.chain:
        remaining = list(context.chain)
        step = maybe_signature(remaining.pop(), app)
        if context.is_eager:
            step.apply((retval,))
        else:
            step.apply_async((retval,), chain=remaining, **lineage)


def run_errbacks(app: Any, context: Context, exc: BaseException, text: str) -> None:
    """Run ``link_error`` errbacks: in this process as ``errback(request, exc,
    traceback)`` when the errback task is registered here, unbound and takes more than
    one argument (Celery's rule); otherwise sent as a task with the failed task's id."""
    for raw in context.errbacks:
        signature = maybe_signature(raw, app)
        try:
            task = app.tasks.get(signature.name)
            if task is not None and _takes_request(task, signature):
                signature(context, exc, text)
            elif context.is_eager:
                signature.apply((context.id,))
            else:
                signature.apply_async(
                    (context.id,), parent_id=context.id, root_id=context.root_id or context.id
                )
        except Exception:
            log.exception("task %s: errback %r failed", context.id, signature)


def _takes_request(task: Task, signature: Any) -> bool:
    if task.bind:
        return False
    try:
        parameters = list(inspect.signature(task.run).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) - (0 if signature.immutable else len(signature.args)) > 1


def run_eager(task: Task, args: tuple, kwargs: dict, task_id: str, options: dict) -> Any:
    """``task.apply()``: run here, store nothing, return an EagerResult."""
    from kernel.result import EagerResult

    context = Context(
        id=task_id,
        task=task.name,
        args=args,
        kwargs=kwargs,
        is_eager=True,
        called_directly=False,
        root_id=task_id,
        callbacks=_as_list(options.get("link")),
        errbacks=_as_list(options.get("link_error")),
    )
    outcome, meta = execute(task, context, store=False)
    while outcome.state == states.RETRY:  # bounded by the task's max_retries
        context.retries += 1
        outcome, meta = execute(task, context, store=False)
    result = EagerResult(task_id, task.app, meta, task_name=task.name)
    if task.app.conf.task_eager_propagates and meta.get("status") == states.FAILURE:
        result.get()  # raises the task's exception, as Celery's eager_propagates does
    return result


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return [dict(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
