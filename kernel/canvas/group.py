"""group: tasks run in parallel, results read back in order."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from kernel.canvas.signature import Signature, _as_list, _new_id, maybe_signature


@Signature.register_type("group")
class group(Signature):  # noqa: N801 - Celery's name
    """Tasks run in parallel; ``apply_async`` returns a GroupResult, in member order."""

    def __init__(self, *tasks: Any, app: Any = None, **options: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], dict) and isinstance(tasks[0], Iterable):
            tasks = tuple(tasks[0])
        app = app or next((getattr(t, "_app", None) for t in tasks if t is not None), None)
        members = [maybe_signature(t, app) for t in tasks]
        super().__init__(
            "celery.group", (), {"tasks": members}, options, subtask_type="group", app=app
        )

    @classmethod
    def from_dict(cls, data: dict, app: Any = None) -> group:
        tasks = (data.get("kwargs") or {}).get("tasks") or ()
        sig = cls(*tasks, app=app, **dict(data.get("options") or {}))
        sig["immutable"] = bool(data.get("immutable"))
        return sig

    @property
    def tasks(self) -> list[Signature]:
        return self.kwargs["tasks"]

    def __len__(self) -> int:  # a dict's len would count its keys
        return len(self.tasks)

    def __iter__(self) -> Any:
        return iter(self.tasks)

    def clone(self, args: Any = None, kwargs: Any = None, **options: Any) -> group:
        copied = group.from_dict(copy.deepcopy(dict(self)), app=self._app)
        copied.options.update(options)
        if args or kwargs:
            copied.kwargs["tasks"] = [t.clone(args, kwargs) for t in copied.tasks]
        return copied

    def link(self, callback: Any) -> Any:
        raise TypeError(
            "a group has no single result to pass on: use a chord, "
            "chord(group(...), callback), to run a task with all its results"
        )

    def link_error(self, errback: Any) -> Any:
        for task in self.tasks:
            task.link_error(errback)
        return errback

    def freeze(self, _id: str | None = None, **fields: Any) -> Any:
        from kernel.result import GroupResult

        group_id = _id or self.options.get("task_id") or _new_id()
        self.options["task_id"] = group_id
        # Inside another group (a chord's header), members answer to the outermost
        # group, whose chord counts every task however deeply the groups nest.
        member_group = fields.get("group_id") or group_id
        results = [
            task.freeze(group_id=member_group, group_index=index, **_member_fields(fields))
            for index, task in enumerate(self.tasks)
        ]
        return GroupResult(group_id, results, app=self._need_app())

    def __call__(self, *args: Any, **options: Any) -> Any:
        """``group(...)(*args)`` sends the group with ``args`` prepended to each member's."""
        return self.apply_async(args, **options)

    def apply_async(
        self, args: Any = None, kwargs: Any = None, app: Any = None, **options: Any
    ) -> Any:
        from kernel.result import GroupResult

        app = self._need_app(app)
        if app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        options = {**self.options, **options}
        if options.get("link"):
            raise TypeError("cannot link a callback to a group: use chord(group(...), callback)")
        rest = _as_list(options.pop("chain", None))
        if rest:  # a group in the middle of a chain: its results go to the next step
            from kernel.canvas.chord import chord

            body = Signature.from_dict(rest[-1], app)
            if rest[:-1]:
                body.options["chain"] = rest[:-1]
            return chord(self, body, app=app).apply_async(args, kwargs, **options)
        group_id = options.pop("task_id", None) or _new_id()
        chord_body = options.pop("chord", None)
        options.pop("group_index", None)  # a nested group takes no index of its own
        member_group = options.pop("group_id", None) or group_id  # see freeze()
        results = []
        for index, task in enumerate(self.tasks):
            member = task.clone()
            member_options = dict(options, group_id=member_group, group_index=index)
            if chord_body is not None:
                member_options["chord"] = chord_body
            results.append(member.apply_async(args, kwargs, app=app, **member_options))
        result = GroupResult(group_id, results, app=app)
        _replace_trail(app, results, result)
        return result

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        from kernel.result import GroupResult

        app = self._need_app()
        group_id = options.pop("task_id", None) or _new_id()
        results = [task.apply(args, kwargs, **options) for task in self.tasks]
        return GroupResult(group_id, results, app=app)

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"


def _member_fields(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if k in ("chord", "root_id", "parent_id")}


def _replace_trail(app: Any, results: list, result: Any) -> None:
    """Record a group sent from a task as one child (a GroupResult), as Celery does."""
    from kernel.task import current_request

    request = current_request()
    if request is None or not results:
        return
    ids = {r.id for r in results}
    kept = [c for c in request.children if _trail_id(c) not in ids]
    kept.append(result.as_tuple())
    request.children[:] = kept


def _trail_id(entry: Any) -> Any:
    while isinstance(entry, (list, tuple)) and entry:
        entry = entry[0]
    return entry
