"""Signatures: a task call packed into a JSON-able dict that travels in messages.

This is the part of the canvas the foundation needs (``link``/``link_error``
callbacks). Chains, groups and chords arrive with the canvas issue. The dict layout
is Celery's (``task, args, kwargs, options, subtask_type, immutable``) so signatures
embedded in messages interoperate.
"""

from __future__ import annotations

from typing import Any


class Signature(dict):
    """A task name with arguments and options; ``sig.delay()`` sends it."""

    def __init__(
        self,
        task: Any = None,
        args: Any = None,
        kwargs: Any = None,
        options: dict | None = None,
        subtask_type: str | None = None,
        immutable: bool = False,
        app: Any = None,
        **extra: Any,
    ) -> None:
        if isinstance(task, dict):  # from a message
            data = dict(task)
            super().__init__(
                task=data.get("task"),
                args=list(data.get("args") or ()),
                kwargs=dict(data.get("kwargs") or {}),
                options=dict(data.get("options") or {}),
                subtask_type=data.get("subtask_type"),
                immutable=bool(data.get("immutable")),
                chord_size=data.get("chord_size"),
            )
        else:
            name = getattr(task, "name", task)
            options = dict(options or {})
            immutable = bool(options.pop("immutable", immutable))
            super().__init__(
                task=name,
                args=list(args or ()),
                kwargs=dict(kwargs or {}),
                options=options,
                subtask_type=subtask_type,
                immutable=immutable,
                chord_size=None,
                **extra,
            )
        self._app = app

    @property
    def name(self) -> str:
        return self["task"]

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
    def immutable(self) -> bool:
        return bool(self.get("immutable"))

    def bind_app(self, app: Any) -> Signature:
        self._app = app
        return self

    def apply_async(
        self, args: Any = None, kwargs: Any = None, app: Any = None, **options: Any
    ) -> Any:
        """Send the signature; extra ``args`` are prepended unless it is immutable."""
        app = app or self._app
        if app is None:
            raise RuntimeError(
                f"signature {self.name!r} is not bound to an app; create it with "
                "task.s(...) or pass app= to apply_async"
            )
        if self.immutable:
            call_args, call_kwargs = list(self.args), dict(self.kwargs)
        else:
            call_args = list(args or ()) + list(self.args)
            call_kwargs = {**self.kwargs, **(kwargs or {})}
        merged = {**self.options, **options}
        task = app.tasks.get(self.name)
        if task is not None:
            return task.apply_async(call_args, call_kwargs, **merged)
        return app.send_task(self.name, call_args, call_kwargs, **merged)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def __repr__(self) -> str:
        arguments = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(arguments)})"


def signature(
    task: Any, args: Any = None, kwargs: Any = None, app: Any = None, **options: Any
) -> Signature:
    """Build a signature from a task, a task name, or a signature dict."""
    if isinstance(task, Signature):
        return task
    return Signature(task, args, kwargs, options, app=app)


def maybe_signature(value: Any, app: Any = None) -> Signature | None:
    if value is None:
        return None
    sig = value if isinstance(value, Signature) else Signature(value)
    return sig.bind_app(app) if app is not None else sig
