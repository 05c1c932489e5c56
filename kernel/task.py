"""Tasks: the decorated function, how it is called, and the request it runs in.

``@app.task`` turns a function into a :class:`Task`. Calling the task runs it here;
``delay``/``apply_async`` send it to a worker; ``task.request`` is the context of
the current execution (Celery's ``self.request`` in bound tasks).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
import traceback as traceback_module
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs

from kernel.retry_policy import RetryPolicy

if TYPE_CHECKING:
    from kernel.app import App
    from kernel.result import AsyncResult

#: The task executing right now in this thread or coroutine, and its context.
_current: contextvars.ContextVar[tuple[Task, Context] | None] = contextvars.ContextVar(
    "kernel_current_task", default=None
)


@attrs.define
class Context:
    """What a task can learn about its own execution (``self.request``)."""

    id: str | None = None
    task: str | None = None
    args: tuple = ()
    kwargs: dict = attrs.Factory(dict)
    retries: int = 0
    is_eager: bool = False
    called_directly: bool = True
    eta: Any = None
    expires: Any = None
    hostname: str | None = None
    delivery_info: dict = attrs.Factory(dict)
    reply_to: str | None = None
    correlation_id: str | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    origin: str | None = None
    timelimit: tuple = (None, None)
    headers: dict = attrs.Factory(dict)
    callbacks: list = attrs.Factory(list)
    errbacks: list = attrs.Factory(list)
    chain: list = attrs.Factory(list)
    chord: Any = None
    group_index: int | None = None
    children: list = attrs.Factory(list)
    ignore_result: bool = False
    delivery_count: int = 0


_EMPTY_CONTEXT = Context()


def current_task() -> Task | None:
    """The task running in this thread, if any."""
    entry = _current.get()
    return entry[0] if entry else None


@contextlib.contextmanager
def running_as(task: Task, context: Context) -> Iterator[None]:
    """Make ``task``/``context`` the current task while the block runs (messages sent
    in it are recorded as the task's children)."""
    token = _current.set((task, context))
    try:
        yield
    finally:
        _current.reset(token)


def current_request() -> Context | None:
    entry = _current.get()
    return entry[1] if entry else None


class Task:
    """A registered task. Options are class attributes, overridable per task."""

    name: str = ""
    app: App
    typing = True
    bind = False
    ignore_result: bool | None = None
    track_started: bool | None = None
    serializer: str | None = None
    compression: str | None = None
    queue: str | None = None
    routing_key: str | None = None
    exchange: str | None = None
    priority: int | None = None
    acks_late: bool | None = None
    reject_on_worker_lost: bool | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    #: Tasks of this type a worker may start: "10/s", "100/m", "1000/h" or per second.
    rate_limit: str | float | None = None
    expires: Any = None
    #: Retries ``retry()`` allows before giving up; None retries for ever.
    max_retries: int | None = 3
    #: Seconds ``retry()`` waits when given neither ``countdown`` nor ``eta``.
    default_retry_delay: float = 180
    #: Exceptions after which the task retries itself (``retry(exc=...)``); see
    #: :mod:`kernel.retry_policy`.
    autoretry_for: tuple[type[Exception], ...] = ()
    #: Exceptions never retried automatically, even when they match ``autoretry_for``.
    dont_autoretry_for: tuple[type[Exception], ...] = ()
    #: Options automatic retries pass to ``retry()``, e.g. ``{"max_retries": 5}``.
    retry_kwargs: dict[str, Any] = {}  # read only: copied when used
    #: Exponential backoff for automatic retries: True (a factor of 1 second) or a factor.
    retry_backoff: bool | float = False
    #: Upper bound of the backoff delay, in seconds.
    retry_backoff_max: float = 600
    #: Wait a random time between 0 and the backoff delay ("full jitter").
    retry_jitter: bool = True

    #: The user's function, set by the decorator.
    run: Callable[..., Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check the retry options when a task (or a base class) is defined, not at its
        first failure."""
        super().__init_subclass__(**kwargs)
        policy = RetryPolicy.for_task(cls)
        cls.autoretry_for = policy.autoretry_for  # lists become tuples
        cls.dont_autoretry_for = policy.dont_autoretry_for

    # -- calling here -------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task body in this process (like calling the function)."""
        if _current.get() is not None and _current.get()[0] is self:
            return self._invoke(args, kwargs)
        token = _current.set((self, Context(args=args, kwargs=kwargs, task=self.name)))
        try:
            return self._invoke(args, kwargs)
        finally:
            _current.reset(token)

    def _invoke(self, args: tuple, kwargs: dict) -> Any:
        if self.bind:
            return self.run(self, *args, **kwargs)
        return self.run(*args, **kwargs)

    def run_with_context(self, context: Context) -> Any:
        """Run the body with ``context`` as ``self.request`` (used by workers and eager mode).

        Automatic retries happen here, so they work on every pool, in eager mode, and
        inside ``kernel_task_execute`` wrappers (which see the ``Retry``).
        """
        token = _current.set((self, context))
        try:
            try:
                return self._invoke(tuple(context.args), dict(context.kwargs))
            except Exception as exc:
                if not self.autoretry_for:
                    raise
                policy = RetryPolicy.for_task(self)
                if not policy.should_retry(exc):
                    raise
                # Past max_retries, retry() raises exc itself: the task fails with it.
                raise self.retry(exc=exc, **policy.retry_options(context.retries)) from exc
        finally:
            _current.reset(token)

    def option(self, name: str) -> Any:
        """This task's ``name`` option, or the app's ``task_<name>`` setting when unset.

        For ``acks_late``, ``reject_on_worker_lost``, ``track_started`` and ``ignore_result``.
        """
        value = getattr(self, name)
        return getattr(self.app.conf, f"task_{name}") if value is None else value

    @property
    def request(self) -> Context:
        entry = _current.get()
        if entry is not None and entry[0] is self:
            return entry[1]
        return _EMPTY_CONTEXT

    # -- sending --------------------------------------------------------------------------

    @functools.cached_property
    def _call_signature(self) -> inspect.Signature | None:
        """The signature callers must match (without ``self`` for bound tasks), computed once."""
        try:
            signature = inspect.signature(self.run)
        except (TypeError, ValueError):  # builtins without signatures
            return None
        params = list(signature.parameters.values())
        if self.bind and params:
            signature = signature.replace(parameters=params[1:])
        return signature

    def check_arguments(self, args: tuple, kwargs: dict) -> None:
        """Raise TypeError, before anything is sent, when the call would not bind."""
        signature = self._call_signature if self.typing else None
        if signature is None:
            return
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}{signature}: {exc}") from None

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Send the task with these arguments: ``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> AsyncResult:
        """Send the task to a worker; returns its :class:`~kernel.result.AsyncResult`.

        Options: ``countdown``, ``eta``, ``expires``, ``queue``, ``routing_key``,
        ``exchange``, ``priority``, ``task_id``, ``headers``, ``serializer``,
        ``compression``, ``link``, ``link_error``, ``ignore_result``, ``time_limit``,
        ``soft_time_limit``, ``retry`` and ``retry_policy`` (whether and how sending
        retries when the broker connection fails; ``task_publish_retry`` and
        ``task_publish_retry_policy`` by default). Raises
        :class:`~kernel.exceptions.PublishError` when the message could not be sent.
        """
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        self.check_arguments(args, kwargs)
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        for option in (
            "serializer",
            "compression",
            "priority",
            "time_limit",
            "soft_time_limit",
            "expires",
        ):
            value = getattr(self, option)
            if value is not None:
                options.setdefault(option, value)
        if self.ignore_result is not None:
            options.setdefault("ignore_result", self.ignore_result)
        task_routing = {
            k: getattr(self, k) for k in ("queue", "routing_key", "exchange") if getattr(self, k)
        }
        return self.app.send_task(self.name, args, kwargs, task_routing=task_routing, **options)

    def apply(
        self, args: Any = None, kwargs: Any = None, *, task_id: str | None = None, **options: Any
    ) -> AsyncResult:
        """Run the task here and now, as a worker would; returns an EagerResult."""
        from kernel.worker.execute import run_eager

        return run_eager(
            self, tuple(args or ()), dict(kwargs or {}), task_id or str(uuid.uuid4()), options
        )

    def AsyncResult(self, task_id: str) -> AsyncResult:  # noqa: N802 - Celery's name
        return self.app.AsyncResult(task_id, task_name=self.name)

    def update_state(
        self, task_id: str | None = None, state: str | None = None, meta: Any = None
    ) -> None:
        """Record a custom state (progress) for this task, or for ``task_id``."""
        task_id = task_id or self.request.id
        if task_id is None:
            raise RuntimeError(
                f"{self.name}.update_state() needs a task_id when called outside a task"
            )
        self.app.backend.store_result(task_id, meta, state or "PROGRESS", request=self.request)

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Send this task again (same id, ``retries`` + 1) and end the current run.

        Waits ``countdown`` seconds (default ``default_retry_delay``) or until ``eta``;
        ``max_retries`` overrides the task's for this call. Past the limit (None: none)
        it raises ``exc`` if given, so the task fails with the error that made it retry,
        else :class:`~kernel.exceptions.MaxRetriesExceededError`. Raises
        :class:`~kernel.exceptions.Retry` when ``throw`` is true, which the worker records
        as the RETRY state; write ``raise self.retry(...)`` to make the end of the run
        visible.
        """
        from kernel.exceptions import MaxRetriesExceededError, Retry

        request = self.request
        if request.id is None or request.called_directly:
            raise RuntimeError(
                f"{self.name}.retry() only works while the task runs in a worker or with "
                "apply(); it was called directly"
            )
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            handled = sys.exc_info()[1]
            raise MaxRetriesExceededError(
                exc=handled,
                task_name=self.name,
                task_id=request.id,
                task_args=request.args,
                task_kwargs=request.kwargs,
                retries=request.retries,
                max_retries=limit,
            ) from handled
        if countdown is None and eta is None:
            countdown = self.default_retry_delay
        call_args = request.args if args is None else args
        call_kwargs = request.kwargs if kwargs is None else kwargs
        if request.is_eager:  # apply() runs it again at once with retries + 1, no waiting
            request.args, request.kwargs = tuple(call_args), dict(call_kwargs)
            self.app.plugins.hook.kernel_task_retry(task=self, request=request, reason=exc)
            raise Retry(f"retry {self.name}[{request.id}] eagerly", exc, None)
        when = eta if eta is not None else f"in {countdown}s"
        reason = exc if exc is not None else f"retry requested ({when})"
        # Store RETRY before sending: a fast retry could otherwise finish first and have
        # its SUCCESS overwritten by this run's RETRY.
        if not (request.ignore_result or self.option("ignore_result")):
            self.app.backend.store_result(
                request.id,
                reason if isinstance(reason, BaseException) else Retry(reason),
                "RETRY",
                traceback_module.format_exc() if exc is not None else None,
                request=request,
            )
        info = request.delivery_info or {}
        if info.get("routing_key") is not None and not any(
            k in options for k in ("queue", "exchange", "routing_key")
        ):  # back where it came from, as Celery does: same exchange and routing key
            options.update(
                exchange=info.get("exchange") or "",
                routing_key=info["routing_key"],
                declare=False,
                queue=info["routing_key"],
            )
        if "priority" not in options and info.get("priority") is not None:
            options["priority"] = info["priority"]
        hard, soft = (list(request.timelimit or ()) + [None, None])[:2]
        self.app.send_task(
            self.name,
            call_args,
            call_kwargs,
            task_id=request.id,
            retries=request.retries + 1,
            countdown=countdown,
            eta=eta,
            expires=request.expires,
            time_limit=hard,
            soft_time_limit=soft,
            ignore_result=request.ignore_result or None,
            link=request.callbacks or None,
            link_error=request.errbacks or None,
            root_id=request.root_id,
            parent_id=request.parent_id,
            group_id=request.group,
            **options,
        )
        self.app.plugins.hook.kernel_task_retry(task=self, request=request, reason=reason)
        if throw:
            raise Retry(f"retry {self.name}[{request.id}] {when}: {reason}", exc, when)
        return None

    # -- canvas --------------------------------------------------------------------------

    def signature(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        from kernel.canvas import Signature

        return Signature(self.name, args, kwargs, options, app=self.app)

    def s(self, *args: Any, **kwargs: Any) -> Any:
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Any:
        return self.signature(args, kwargs, immutable=True)

    subtask = signature

    def map(self, it: Any) -> Any:
        """One message that runs this task for each item: ``[task(i) for i in it]``."""
        from kernel.canvas import xmap

        return xmap(self.s(), it, app=self.app)

    def starmap(self, it: Any) -> Any:
        """One message that runs ``task(*item)`` for each item."""
        from kernel.canvas import xstarmap

        return xstarmap(self.s(), it, app=self.app)

    def chunks(self, it: Any, n: int) -> Any:
        """Split ``it`` into messages of ``n`` calls each (a group of starmaps)."""
        from kernel.canvas import chunks

        return chunks(self.s(), it, n, app=self.app)

    def replace(self, sig: Any) -> Any:
        """Replace this running task with ``sig``: it takes over this task's id, its
        place in a chain or chord and its callbacks; this run ends here (``Ignore``).

        A group is replaced as a chord whose body gathers its results, so whoever
        waits on this task gets the list of them.
        """
        from kernel.canvas import chain, chord, group, maybe_signature, signature
        from kernel.exceptions import Ignore

        request = self.request
        if request.id is None or request.called_directly:
            raise RuntimeError(f"{self.name}.replace() only works while the task runs")
        sig = maybe_signature(sig, self.app)
        if isinstance(sig, chain) and not sig.tasks:
            raise ValueError("cannot replace a task with an empty chain")
        if sig.options.get("chord") is not None:
            raise ValueError("cannot replace a task with a signature that is part of a chord")
        if isinstance(sig, group):
            sig = chord(sig, signature("celery.accumulate", kwargs={"index": 0}, app=self.app))
        sig = sig.clone()
        for callback in request.callbacks:
            sig.link(callback)
        for errback in request.errbacks:
            sig.link_error(errback)
        nesting = int((request.headers or {}).get("replaced_task_nesting") or 0) + 1
        sig.freeze(request.id)  # the replacement's result is this task's result
        options: dict[str, Any] = {"root_id": request.root_id}
        if request.chain:  # the rest of this task's chain runs after the replacement
            for step in reversed(request.chain):
                sig = sig | maybe_signature(step, self.app)
        else:  # its place in a group or chord
            if request.group:
                options.update(group_id=request.group, group_index=request.group_index)
            if request.chord:
                options["chord"] = request.chord
        options["headers"] = {"replaced_task_nesting": nesting}
        if request.is_eager:
            value = sig.apply().get(disable_sync_subtasks=False)
            raise Ignore(f"replaced by {sig!r}, which returned {value!r}")
        sig.apply_async(**options)
        raise Ignore(f"replaced by {sig!r}")

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def task_name_for(app: App, function: Callable[..., Any]) -> str:
    """``module.function``; tasks defined in ``__main__`` use the app's main name."""
    module = function.__module__
    if module == "__main__" and app.main:
        module = app.main
    return f"{module}.{function.__qualname__}"
