"""Handles on task results: ``AsyncResult`` (stored) and ``EagerResult`` (in process)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from kernel import states
from kernel.backends import document
from kernel.protocol import parse_datetime
from kernel.task import current_request

if TYPE_CHECKING:
    from kernel.app import App


def _refuse_sync_wait(task_id: str) -> None:
    request = current_request()
    if request is not None and not request.is_eager and not request.called_directly:
        raise RuntimeError(
            f"task {request.task} ({request.id}) waits on the result of {task_id}: never "
            "call result.get() inside a task, it can deadlock the worker. Use a callback "
            "(link=...) instead, or pass disable_sync_subtasks=False if you must."
        )


class AsyncResult:
    """The result of a task sent to a worker, read from the result backend."""

    def __init__(
        self, id: str, app: App, task_name: str | None = None, backend: Any = None
    ) -> None:
        self.id = str(id)
        self.app = app
        self.task_name = task_name
        self._backend = backend
        self._cache: dict | None = None

    @property
    def backend(self) -> Any:
        return self._backend if self._backend is not None else self.app.backend

    def _meta(self) -> dict:
        if self._cache is not None:
            return self._cache
        meta = self.backend.get_task_meta(self.id)
        if meta["status"] in states.READY_STATES:
            self._cache = meta
        return meta

    @property
    def state(self) -> str:
        return self._meta()["status"]

    status = state

    @property
    def result(self) -> Any:
        """The return value, the exception for failures, or a custom state's meta."""
        return document.result_value(self._meta())

    info = result

    @property
    def traceback(self) -> str | None:
        return self._meta().get("traceback")

    @property
    def date_done(self) -> datetime | None:
        return parse_datetime(self._meta().get("date_done"))

    @property
    def children(self) -> list[AsyncResult]:
        return [self.app.AsyncResult(_child_id(c)) for c in self._meta().get("children") or []]

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float | None = None,
        disable_sync_subtasks: bool = True,
    ) -> Any:
        """Wait for the task and return its value; raise its exception if ``propagate``.

        ``timeout`` seconds (None waits for ever) raises ``kernel.exceptions.TimeoutError``.
        """
        if disable_sync_subtasks:
            _refuse_sync_wait(self.id)
        if self._cache is None:
            self._cache = self.backend.wait_for(self.id, timeout=timeout, interval=interval)
        return self._value(propagate)

    def _value(self, propagate: bool) -> Any:
        """The ready result's value; its exception is raised when ``propagate``."""
        value = document.result_value(self._cache)
        failed = self._cache["status"] in states.PROPAGATE_STATES
        if propagate and failed and isinstance(value, BaseException):
            raise value
        return value

    wait = get

    def forget(self) -> None:
        """Delete the stored result."""
        self._cache = None
        self.backend.forget(self.id)

    def as_tuple(self) -> tuple:
        return (self.id, None)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return other.id == self.id
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __str__(self) -> str:
        return self.id


def _child_id(child: Any) -> str:
    # Celery stores children as result tuples ((id, parent), None); accept plain ids too.
    while isinstance(child, (list, tuple)) and child:
        child = child[0]
    return str(child)


class EagerResult(AsyncResult):
    """A result computed in this process (``apply()`` or ``task_always_eager``)."""

    def __init__(self, id: str, app: App, meta: dict, task_name: str | None = None) -> None:
        super().__init__(id, app, task_name)
        self._cache = meta

    def _meta(self) -> dict:
        return self._cache  # type: ignore[return-value]

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float | None = None,
        disable_sync_subtasks: bool = True,
    ) -> Any:
        return self._value(propagate)

    wait = get

    def forget(self) -> None:
        """Eager results are not stored; nothing to delete."""
