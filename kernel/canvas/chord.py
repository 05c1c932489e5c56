"""chord: a group whose results, in order, go to one task."""

from __future__ import annotations

import copy
from typing import Any

from kernel.canvas.group import group
from kernel.canvas.signature import Signature, _as_list, _new_id, maybe_signature


@Signature.register_type("chord")
class chord(Signature):  # noqa: N801 - Celery's name
    """A group (the header) whose results, in order, go to one task (the body).

    Needs a result backend that supports chords (SQLite, Redis, SQL); the body runs
    once, when the last header task finished. A header task that fails makes the body
    fail with ``ChordError`` naming it, and the body's errbacks run.
    """

    def __init__(
        self, header: Any = None, body: Any = None, app: Any = None, **options: Any
    ) -> None:
        header_group = header if isinstance(header, group) else None
        if header_group is None:
            if isinstance(header, dict) and header.get("subtask_type") == "group":
                header_group = group.from_dict(header, app)
            else:
                header_group = group(*(header or ()), app=app)
        app = app or header_group._app or getattr(body, "_app", None)
        header_group.bind_app(app) if app else None
        body_sig = maybe_signature(body, app) if body is not None else None
        super().__init__(
            "celery.chord",
            (),
            {"kwargs": {}, "header": header_group, "body": body_sig},
            options,
            subtask_type="chord",
            app=app,
        )

    @classmethod
    def from_dict(cls, data: dict, app: Any = None) -> chord:
        kwargs = data.get("kwargs") or {}
        sig = cls(
            kwargs.get("header"), kwargs.get("body"), app=app, **dict(data.get("options") or {})
        )
        sig["immutable"] = bool(data.get("immutable"))
        return sig

    @property
    def tasks(self) -> list[Signature]:
        return self.header.tasks

    @property
    def header(self) -> group:
        return self.kwargs["header"]

    @property
    def body(self) -> Signature | None:
        return self.kwargs["body"]

    def __call__(self, body: Any = None, **options: Any) -> Any:  # chord(header)(body)
        if body is not None:
            self.kwargs["body"] = maybe_signature(body, self._app)
        return self.apply_async(**options)

    def clone(self, args: Any = None, kwargs: Any = None, **options: Any) -> chord:
        copied = chord.from_dict(copy.deepcopy(dict(self)), app=self._app)
        copied.options.update(options)
        if args or kwargs:
            copied.kwargs["header"] = copied.header.clone(args, kwargs)
        return copied

    def link(self, callback: Any) -> Any:
        return self._need_body().link(callback)

    def link_error(self, errback: Any) -> Any:
        return self._need_body().link_error(errback)

    def _need_body(self) -> Signature:
        if self.body is None:
            raise ValueError("this chord has no body yet: chord(header, body)")
        return self.body

    def freeze(self, _id: str | None = None, **fields: Any) -> Any:
        """The body's result: a chord's outcome is its body's."""
        body = self._need_body()
        return body.freeze(_id or self.options.get("task_id"), **fields)

    def apply_async(
        self, args: Any = None, kwargs: Any = None, app: Any = None, **options: Any
    ) -> Any:
        app = self._need_app(app)
        body = self._need_body().clone()
        if app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        options = {**self.options, **options}
        rest = _as_list(options.pop("chain", None))
        if rest:  # what follows the chord in a chain runs after the body
            body.options["chain"] = [*rest, *_as_list(body.options.get("chain"))]
        for key in ("link", "link_error"):
            for sig in _as_list(options.pop(key, None)):
                getattr(body, key)(sig)
        body_id = options.pop("task_id", None) or body.id or _new_id()
        for key in ("group_id", "group_index", "chord"):  # a chord inside a group or
            value = options.pop(key, None)  # chord: its body is what finishes the member
            if value is not None:
                body.options[key] = value
        if options.get("root_id") is not None:
            body.options["root_id"] = options["root_id"]
        header = self.header.clone()
        if not header.tasks:  # nothing to wait for
            return body.apply_async(([],), app=app, task_id=body_id)
        app.backend.ensure_chords_supported("chord")
        group_id = _new_id()
        body.options["task_id"] = body_id
        # A nested chord's body answers to the outer chord (its group id, set above);
        # otherwise it carries its own header's group id, as Celery's bodies do.
        body.options.setdefault("group_id", group_id)
        header_result = header.freeze(group_id)
        app.backend.apply_chord(group_id, header_result, dict(body))
        header.apply_async(args, kwargs, app=app, task_id=group_id, chord=dict(body), **options)
        result = app.AsyncResult(body_id, task_name=body.name)
        result.parent = header_result
        return result

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Run the header here, then the body with its results (eager mode)."""
        header_result = self.header.apply(args, kwargs)
        values = [r.get() for r in header_result.results]
        return self._need_body().apply((values,), **options)

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"
