"""Running one task: context, hooks, result storing, callbacks.

Runs wherever the pool runs the task (the worker's thread, a thread of the
``threads`` pool, a ``prefork`` child) and in eager mode. The worker's main loop only
sees the :class:`Outcome`, which decides how the message is acknowledged.
"""

from __future__ import annotations

import logging
import reprlib
import time
import traceback as traceback_module
from typing import Any

import attrs

from kernel import states
from kernel.backends import document
from kernel.canvas import maybe_signature
from kernel.exceptions import Ignore, Reject, Retry
from kernel.protocol import DecodedTask
from kernel.task import Context, Task

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
        backend.mark_as_started(context.id, {"hostname": context.hostname})
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
    try:
        retval = hook.kernel_task_execute(request=ExecutionRequest(task, context))
    except Reject as exc:
        state, reject, requeue = states.REJECTED, True, exc.requeue
        log.warning(
            "task %s[%s] rejected itself: %s (requeue=%s)",
            task.name,
            context.id,
            exc.reason,
            exc.requeue,
        )
    except Ignore:
        state = states.IGNORED
    except Retry as exc:  # task.retry() stored the RETRY state before sending the retry
        state = states.RETRY
        log.info("task %s[%s] will retry: %s", task.name, context.id, exc)
    except Exception as exc:  # SystemExit ends the process running it, as in Celery
        state = states.FAILURE
        text = traceback_module.format_exc()
        retval = exc
        if backend is not None and (not ignore or app.conf.task_store_errors_even_if_ignored):
            meta = backend.mark_as_failure(context.id, exc, text, request=context)
        else:
            meta = document.build(context.id, state, exc, text)
        log.error(
            "task %s[%s] raised %s: %s",
            task.name,
            context.id,
            type(exc).__name__,
            exc,
            extra={"task_name": task.name, "task_id": context.id},
        )
        call_hook_safely(
            hook.kernel_task_failure,
            task=task,
            task_id=context.id,
            exception=exc,
            traceback=text,
            request=context,
        )
        _send_errbacks(app, context)
    else:
        if backend is not None and not ignore:
            meta = backend.mark_as_done(context.id, retval, request=context)
        else:
            meta = document.build(context.id, state, retval, children=context.children)
        call_hook_safely(hook.kernel_task_success, task=task, result=retval, request=context)
        _send_callbacks(app, context, retval)
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
    for raw in context.callbacks:
        signature = maybe_signature(raw, app)
        try:
            signature.apply_async(
                (retval,), parent_id=context.id, root_id=context.root_id or context.id
            )
        except Exception:
            log.exception("task %s: could not send callback %r", context.id, signature)


def _send_errbacks(app: Any, context: Context) -> None:
    for raw in context.errbacks:
        signature = maybe_signature(raw, app)
        try:
            signature.apply_async(
                (context.id,), parent_id=context.id, root_id=context.root_id or context.id
            )
        except Exception:
            log.exception("task %s: could not send errback %r", context.id, signature)


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
