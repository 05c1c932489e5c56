"""Signature: one task call as data, in Celery's dict layout."""

from __future__ import annotations

import copy
import logging
import uuid
from typing import Any, ClassVar

log = logging.getLogger(__name__)

#: Options a signature may carry that are not ``send_task`` parameters: Celery puts
#: them there (``freeze``, replacing, stamping); they are dropped when sending.
_UNSENT_OPTIONS = frozenset(
    {"subtask_type", "chord_size", "stamped_headers", "stamps", "replaced_task_nesting"}
)
#: ``send_task`` options a merge never overrides (as in Celery).
_KEPT_OPTIONS = frozenset({"group_id"})


def _new_id() -> str:
    return str(uuid.uuid4())


class Signature(dict):
    """One task call as data: ``add.s(2, 2)``; ``sig.delay()`` sends it."""

    #: subtask_type -> class, for rebuilding canvases from their dicts.
    TYPES: ClassVar[dict[str, type[Signature]]] = {}

    def __init__(
        self,
        task: Any = None,
        args: Any = None,
        kwargs: Any = None,
        options: dict | None = None,
        subtask_type: str | None = None,
        immutable: bool = False,
        app: Any = None,
        **extra_options: Any,
    ) -> None:
        if isinstance(task, dict):  # from a message, or a copy
            data = task
            super().__init__(
                task=data.get("task"),
                args=list(data.get("args") or ()),
                kwargs=dict(data.get("kwargs") or {}),
                options=dict(data.get("options") or {}),
                subtask_type=data.get("subtask_type"),
                immutable=bool(data.get("immutable")),
            )
            app = app or getattr(task, "_app", None)
        else:
            if app is None:
                app = getattr(task, "app", None)
            options = {**(options or {}), **extra_options}
            immutable = bool(options.pop("immutable", immutable))
            super().__init__(
                task=getattr(task, "name", task),
                args=list(args or ()),
                kwargs=dict(kwargs or {}),
                options=options,
                subtask_type=subtask_type,
                immutable=immutable,
            )
        self._app = app

    # -- rebuilding -----------------------------------------------------------------------

    @classmethod
    def register_type(cls, name: str) -> Any:
        def register(klass: type[Signature]) -> type[Signature]:
            cls.TYPES[name] = klass
            return klass

        return register

    @classmethod
    def from_dict(cls, data: dict, app: Any = None) -> Signature:
        """The right canvas class for a signature dict (by its ``subtask_type``)."""
        kind = data.get("subtask_type")
        if kind and kind in Signature.TYPES:
            return Signature.TYPES[kind].from_dict(data, app=app)
        return Signature(data, app=app)

    # -- fields -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self["task"]

    task = name

    @property
    def args(self) -> list:
        return self["args"]

    @property
    def kwargs(self) -> dict:
        return self["kwargs"]

    @property
    def options(self) -> dict:
        return self["options"]

    @property
    def subtask_type(self) -> str | None:
        return self.get("subtask_type")

    @property
    def immutable(self) -> bool:
        return bool(self.get("immutable"))

    @property
    def id(self) -> str | None:
        """The task id it will be sent with, once frozen."""
        return self.options.get("task_id")

    @property
    def app(self) -> Any:
        return self._app

    def bind_app(self, app: Any) -> Signature:
        self._app = app
        return self

    def _need_app(self, app: Any = None) -> Any:
        app = app or self._app
        if app is None:
            raise RuntimeError(
                f"signature {self.name!r} is not bound to an app; create it with "
                "task.s(...) or app.signature(...), or pass app= to apply_async"
            )
        return app

    @property
    def type(self) -> Any:
        """The registered task this signature calls."""
        return self._need_app().get_task(self.name)

    # -- changing -----------------------------------------------------------------------

    def clone(self, args: Any = None, kwargs: Any = None, **options: Any) -> Signature:
        """A copy with ``args`` prepended, ``kwargs`` and ``options`` merged (new win)."""
        copied = Signature.from_dict(copy.deepcopy(dict(self)), app=self._app)
        if args or kwargs or options:
            copied["args"], copied["kwargs"], copied["options"] = self._merge(args, kwargs, options)
        return copied

    partial = clone

    def _merge(self, args: Any, kwargs: Any, options: dict) -> tuple[list, dict, dict]:
        """Partial application: new args go first, new kwargs and options win.

        An immutable signature keeps its arguments; only its options change.
        """
        merged_options = {**self.options}
        for key, value in options.items():
            if key in _KEPT_OPTIONS and merged_options.get(key) is not None:
                continue
            merged_options[key] = value
        if self.immutable:
            return list(self.args), dict(self.kwargs), merged_options
        return (
            list(args or ()) + list(self.args),
            {**self.kwargs, **(kwargs or {})},
            merged_options,
        )

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        """Set options in place (``countdown=10``, ``queue='low'``...); returns self."""
        if immutable is not None:
            self["immutable"] = bool(immutable)
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = bool(immutable)

    def link(self, callback: Any) -> Any:
        """Run ``callback`` with this task's result when it succeeds."""
        self.options.setdefault("link", [])
        self.options["link"] = [*_as_list(self.options["link"]), callback]
        return callback

    def link_error(self, errback: Any) -> Any:
        """Run ``errback`` when this task fails."""
        self.options["link_error"] = [*_as_list(self.options.get("link_error")), errback]
        return errback

    on_error = link_error

    def freeze(
        self,
        _id: str | None = None,
        group_id: str | None = None,
        chord: Any = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_index: int | None = None,
    ) -> Any:
        """Fix the task id (and group membership) it will be sent with; its result."""
        options = self.options
        if _id is not None:
            options["task_id"] = _id
        options.setdefault("task_id", _new_id())
        for key, value in (
            ("group_id", group_id),
            ("chord", chord),
            ("root_id", root_id),
            ("parent_id", parent_id),
            ("group_index", group_index),
        ):
            if value is not None:
                options[key] = value
        return self.AsyncResult(options["task_id"])

    def AsyncResult(self, task_id: str) -> Any:  # noqa: N802 - Celery's name
        app = self._need_app()
        return app.AsyncResult(task_id, task_name=self.name)

    # -- calling --------------------------------------------------------------------------

    def apply_async(
        self, args: Any = None, kwargs: Any = None, app: Any = None, **options: Any
    ) -> Any:
        """Send it; ``args`` are prepended and ``kwargs`` merged unless it is immutable."""
        app = self._need_app(app)
        call_args, call_kwargs, merged = self._merge(args, kwargs, options)
        send = _sendable(merged)
        task = app.tasks.get(self.name)
        if task is not None:
            return task.apply_async(call_args, call_kwargs, **send)
        return app.send_task(self.name, call_args, call_kwargs, **send)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Run it here and now (eagerly); returns an EagerResult."""
        call_args, call_kwargs, merged = self._merge(args, kwargs, options)
        return self.type.apply(call_args, call_kwargs, **_sendable(merged))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the task's function here with the signature's arguments."""
        call_args, call_kwargs, _ = self._merge(args, kwargs, {})
        return self.type(*call_args, **call_kwargs)

    # -- composing ------------------------------------------------------------------------

    def __or__(self, other: Any) -> Signature:
        from kernel.canvas.chain import chain

        if isinstance(other, chain):
            return chain(self, *other.tasks, app=self._app or other._app, **other.options)
        if isinstance(other, Signature):
            return chain(self, other, app=self._app or other._app)
        return NotImplemented

    def __deepcopy__(self, memo: dict) -> Signature:
        return Signature.from_dict(copy.deepcopy(dict(self), memo), app=self._app)

    def __reduce__(self) -> Any:  # pickles as its dict (the app is not pickled)
        return (Signature.from_dict, (dict(self),))

    def __repr__(self) -> str:
        arguments = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(arguments)}){'!' if self.immutable else ''}"


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, dict):  # one signature
        return [value]
    return list(value)


def _sendable(options: dict) -> dict:
    """The options ``send_task`` understands; Celery-only extras are dropped."""
    sent = {k: v for k, v in options.items() if k not in _UNSENT_OPTIONS}
    dropped = set(options) - set(sent)
    if dropped:
        log.debug("signature options not sent: %s", sorted(dropped))
    return sent


# ---------------------------------------------------------------------------- helpers


def signature(
    task: Any,
    args: Any = None,
    kwargs: Any = None,
    options: dict | None = None,
    app: Any = None,
    **extra_options: Any,
) -> Signature:
    """A signature from a task, a task name, or a signature dict (any canvas type).

    Options come as Celery takes them: an ``options`` dict, keyword options
    (``queue=...``), or both (keywords win); ``immutable=True`` makes it immutable.
    """
    if isinstance(task, Signature):
        return task
    if isinstance(task, dict):
        return Signature.from_dict(task, app=app)
    return Signature(task, args, kwargs, options, app=app, **extra_options)


def maybe_signature(value: Any, app: Any = None) -> Any:
    """``value`` as a Signature (of the right canvas class), or None."""
    if value is None:
        return None
    sig = value if isinstance(value, Signature) else Signature.from_dict(value, app=app)
    if app is not None and sig._app is None:
        sig.bind_app(app)
    return sig
