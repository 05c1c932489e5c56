"""chain: tasks run one after another, each given the previous result."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from kernel.canvas.chord import chord
from kernel.canvas.group import group
from kernel.canvas.signature import Signature, _as_list, maybe_signature


def _flatten_chain(tasks: Iterable[Any], app: Any) -> list[Signature]:
    steps: list[Signature] = []
    for task in tasks:
        sig = maybe_signature(task, app)
        if isinstance(sig, chain) and not sig.options:
            steps.extend(_flatten_chain(sig.tasks, app))
        else:
            steps.append(sig)
    return steps


@Signature.register_type("chain")
class chain(Signature):  # noqa: N801 - Celery's name
    """Tasks run one after another; each gets the previous one's result as its
    first argument (unless it is immutable, ``.si()``)."""

    def __init__(self, *tasks: Any, app: Any = None, **options: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], dict) and isinstance(tasks[0], Iterable):
            tasks = tuple(tasks[0])
        app = app or next((getattr(t, "_app", None) for t in tasks if t is not None), None)
        steps = _flatten_chain(tasks, app)
        super().__init__(
            "celery.chain",
            (),
            {"tasks": steps},
            options,
            subtask_type="chain",
            app=app,
        )

    @classmethod
    def from_dict(cls, data: dict, app: Any = None) -> chain:
        tasks = (data.get("kwargs") or {}).get("tasks") or ()
        sig = cls(*tasks, app=app, **dict(data.get("options") or {}))
        sig["immutable"] = bool(data.get("immutable"))
        return sig

    @property
    def tasks(self) -> list[Signature]:
        return self.kwargs["tasks"]

    def __or__(self, other: Any) -> Signature:
        if isinstance(other, chain):
            return chain(*self.tasks, *other.tasks, app=self._app, **self.options)
        if isinstance(other, Signature):
            return chain(*self.tasks, other, app=self._app, **self.options)
        return NotImplemented

    def clone(self, args: Any = None, kwargs: Any = None, **options: Any) -> chain:
        copied = chain.from_dict(copy.deepcopy(dict(self)), app=self._app)
        copied.options.update(options)
        if (args or kwargs) and copied.tasks:
            copied.tasks[0] = copied.tasks[0].clone(args, kwargs)
        return copied

    def _steps(self, app: Any) -> list[Signature]:
        """Clones of the steps, with each group followed by another step turned into
        a chord whose body is that step (a group's results go to one task)."""
        steps: list[Signature] = []
        for step in (maybe_signature(t, app).clone() for t in self.tasks):
            if steps and isinstance(steps[-1], group) and not isinstance(step, group):
                steps[-1] = chord(steps[-1], step, app=app)
            else:
                steps.append(step)
        return steps

    def freeze(self, _id: str | None = None, **fields: Any) -> Any:
        steps = self._steps(self._need_app())
        self.kwargs["tasks"] = steps
        last = steps[-1].freeze(_id or self.options.get("task_id"), **fields)
        for step in steps[:-1]:
            step.freeze()
        return last

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``chain(...)(*args, **kwargs)`` sends the chain (as in Celery), not a local call."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Any = None, kwargs: Any = None, app: Any = None, **options: Any
    ) -> Any:
        app = self._need_app(app)
        if app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        steps = self._steps(app)
        if not steps:
            raise ValueError("cannot send an empty chain; give it at least one task")
        if any(isinstance(step, chord) for step in steps):  # fail here, not in a worker
            app.backend.ensure_chords_supported("chain with a chord (a group and a task)")
        options = {**self.options, **options}
        rest_of_outer = _as_list(options.pop("chain", None))
        task_id = options.pop("task_id", None)
        link = _as_list(options.pop("link", None))
        link_error = _as_list(options.pop("link_error", None))
        last_fields = {
            key: options.pop(key)
            for key in ("group_id", "group_index", "chord")
            if options.get(key) is not None
        }
        for step in steps:  # a chain's errbacks apply to every step
            for errback in link_error:
                step.link_error(errback)
        for callback in link:
            steps[-1].link(callback)
        result = steps[-1].freeze(task_id, **last_fields)
        previous = None
        for step in steps[:-1]:
            frozen = step.freeze()
            if previous is not None:
                frozen.parent = previous
            previous = frozen
        if previous is not None:  # result.parent is the step before, as in Celery
            result.parent = previous
        # The worker takes the next step from the end: reversed, after the steps of
        # an enclosing chain that run once this one is done.
        pending = rest_of_outer + [dict(step) for step in reversed(steps[1:])]
        sent = steps[0].apply_async(args, kwargs, app=app, chain=pending, **options)
        return sent if len(steps) == 1 else result

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Run every step here, in order (eager mode)."""
        app = self._need_app()
        result = None
        value_args = args
        for step in self._steps(app):
            result = step.apply(value_args, kwargs if result is None else None, **options)
            value_args = (result.get(),)
        return result

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks) or "chain()"
