"""map, starmap, chunks: many calls of one task in few messages."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from kernel.canvas.group import group
from kernel.canvas.signature import Signature, _sendable, maybe_signature


class _map_base(Signature):  # noqa: N801
    """One message that runs a task for every item of an iterable (in one worker)."""

    builtin = ""

    def __init__(self, task: Any, it: Iterable[Any], app: Any = None, **options: Any) -> None:
        task_sig = maybe_signature(task, app)
        app = app or getattr(task_sig, "_app", None)
        super().__init__(
            self.builtin,
            (),
            {"task": task_sig, "it": [list(i) if isinstance(i, tuple) else i for i in it]},
            options,
            immutable=True,
            app=app,
        )

    def clone(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """A copy of the same kind (a plain copy would lose the inner task's routing)."""
        copied = copy.deepcopy(self)
        copied.options.update(options)
        return copied

    def __deepcopy__(self, memo: dict) -> Any:
        copied = type(self).__new__(type(self))
        dict.__init__(copied, copy.deepcopy(dict(self), memo))
        copied._app = self._app
        return copied

    def apply_async(
        self, args: Any = None, kwargs: Any = None, app: Any = None, **options: Any
    ) -> Any:
        from kernel.routing import resolve_route

        app = self._need_app(app)
        options = {**self.options, **options}
        inner_name = self.kwargs["task"]["task"]
        inner = app.tasks.get(inner_name)
        task_routing = {
            k: getattr(inner, k)
            for k in ("queue", "routing_key", "exchange")
            if getattr(inner, k, None)
        }
        route = resolve_route(app, inner_name, (), {}, options, task_routing)  # as the task's
        for key in ("queue", "exchange", "routing_key"):
            options.setdefault(key, route[key])
        return app.send_task(self.name, (), dict(self.kwargs), **_sendable(options))


class xmap(_map_base):  # noqa: N801 - Celery's name
    """``task.map(items)``: ``[task(item) for item in items]`` in one message."""

    builtin = "celery.map"


class xstarmap(_map_base):  # noqa: N801 - Celery's name
    """``task.starmap(items)``: ``[task(*item) for item in items]`` in one message."""

    builtin = "celery.starmap"


class chunks(Signature):  # noqa: N801 - Celery's name
    """``task.chunks(items, n)``: a group of starmap messages of ``n`` items each."""

    def __init__(
        self, task: Any, it: Iterable[Any], n: int, app: Any = None, **options: Any
    ) -> None:
        if int(n) < 1:
            raise ValueError(f"chunk size must be at least 1, got {n!r}")
        task_sig = maybe_signature(task, app)
        app = app or getattr(task_sig, "_app", None)
        super().__init__(
            "celery.chunks",
            (),
            {"task": task_sig, "it": [list(i) for i in it], "n": int(n)},
            options,
            immutable=True,
            app=app,
        )

    def group(self) -> group:
        task, items, n = self.kwargs["task"], self.kwargs["it"], self.kwargs["n"]
        parts = [items[i : i + n] for i in range(0, len(items), n)]
        return group((xstarmap(task, part, app=self._app) for part in parts), app=self._app)

    def apply_async(
        self, args: Any = None, kwargs: Any = None, app: Any = None, **options: Any
    ) -> Any:
        return self.group().apply_async(args, kwargs, app=app, **{**self.options, **options})

    def __call__(self, **options: Any) -> Any:
        return self.apply_async(**options)
