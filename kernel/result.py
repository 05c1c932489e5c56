"""Handles on task results: ``AsyncResult`` (stored), ``EagerResult`` (in process),
``ResultSet`` and ``GroupResult`` (several, read in order).

Results travel between processes as Celery's *result tuples* (in result documents'
``children``, saved groups, and a task returning a result): ``((id, parent), None)``
for a task, ``((group id, parent), [member tuples])`` for a group, where ``parent`` is
the parent's tuple or None. :func:`result_from_tuple` rebuilds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kernel import states
from kernel.backends import document
from kernel.exceptions import TimeoutError
from kernel.protocol import parse_datetime
from kernel.task import current_request

if TYPE_CHECKING:
    from kernel.app import App

#: Results read from the backend in one request when a set is polled or joined.
PREFETCH_BATCH = 500


def _refuse_sync_wait(what: str) -> None:
    request = current_request()
    if request is not None and not request.is_eager and not request.called_directly:
        raise RuntimeError(
            f"task {request.task} ({request.id}) waits on the result of {what}: never "
            "call result.get() inside a task, it can deadlock the worker. Use a callback "
            "(link=...) instead, or pass disable_sync_subtasks=False if you must."
        )


class ResultBase:
    """What every result handle has: an optional ``parent`` (the previous step of a
    chain) and a tuple form (:meth:`as_tuple`)."""

    id: str | None
    parent: ResultBase | None = None

    def _nodes_tuple(self) -> list | None:
        return None

    def as_tuple(self) -> tuple:
        """Celery's tuple form: ``((id, parent tuple or None), member tuples or None)``.

        Built without recursion on parents, so a chain of any length can be encoded.
        """
        lineage: list[ResultBase] = []
        node: ResultBase | None = self
        while node is not None:
            lineage.append(node)
            node = node.parent
        encoded: tuple | None = None
        for node in reversed(lineage):
            encoded = ((node.id, encoded), node._nodes_tuple())
        return encoded  # type: ignore[return-value]


class AsyncResult(ResultBase):
    """The result of a task sent to a worker, read from the result backend."""

    def __init__(
        self,
        id: str,
        app: App,
        task_name: str | None = None,
        backend: Any = None,
        parent: ResultBase | None = None,
    ) -> None:
        self.id = str(id)
        self.app = app
        self.task_name = task_name
        self._backend = backend
        self.parent = parent
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
    def children(self) -> list[ResultBase]:
        """Results of what the task sent while it ran (tasks, groups, chain steps).

        A group comes back as a :class:`GroupResult`.
        """
        return [result_from_tuple(c, self.app) for c in self._meta().get("children") or []]

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

    def revoke(
        self,
        connection: Any = None,
        terminate: bool = False,
        signal: str | int = "SIGTERM",
        wait: bool = False,
        timeout: float | None = None,
    ) -> list[dict] | None:
        """Tell every running worker not to run this task (``app.control.revoke``).

        ``terminate=True`` also stops it if it is running, with ``signal``, as far as
        the worker's pool can. ``wait=True`` waits ``timeout`` seconds (default 1) for
        the workers' replies and returns them. The worker that discards the task
        stores REVOKED.
        """
        return self.app.control.revoke(
            self.id,
            terminate=terminate,
            signal=signal,
            connection=connection,
            reply=wait,
            timeout=1.0 if timeout is None else timeout,
        )

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


def _prefetch(results: Iterable[ResultBase]) -> dict[str, dict]:
    """Read the documents of the plain task results in ``results`` in batches.

    Ready ones are cached on their handles; returns every document read, by id.
    """
    by_backend: dict[int, tuple[Any, list[AsyncResult]]] = {}
    for result in results:
        if type(result) is AsyncResult and result._cache is None:
            backend = result.backend
            by_backend.setdefault(id(backend), (backend, []))[1].append(result)
    read: dict[str, dict] = {}
    for backend, members in by_backend.values():
        get_many = getattr(backend, "get_task_metas", None)
        if get_many is None:  # not a kernel Backend (results disabled): read one by one
            continue
        for start in range(0, len(members), PREFETCH_BATCH):
            batch = members[start : start + PREFETCH_BATCH]
            for result, meta in zip(batch, get_many([r.id for r in batch]), strict=True):
                read[result.id] = meta
                if meta["status"] in states.READY_STATES:
                    result._cache = meta
    return read


class ResultSet(ResultBase):
    """Several results handled together; :meth:`get` returns their values in order."""

    #: Joining reads the members from the backend in batches (Celery's name).
    supports_native_join = True

    def __init__(
        self,
        results: Iterable[ResultBase] | None = None,
        app: App | None = None,
        backend: Any = None,
    ) -> None:
        self.results: list[ResultBase] = list(results or ())
        self._app = app
        self._backend = backend

    @property
    def app(self) -> App:
        if self._app is not None:
            return self._app
        for result in self.results:
            app = getattr(result, "app", None)
            if app is not None:
                return app
        raise RuntimeError(f"{self!r} has no app: pass app= when creating it")

    @app.setter
    def app(self, app: App) -> None:
        self._app = app

    @property
    def backend(self) -> Any:
        return self._backend if self._backend is not None else self.app.backend

    @property
    def children(self) -> list[ResultBase]:
        return self.results

    # -- membership ---------------------------------------------------------------------

    def add(self, result: ResultBase) -> None:
        """Add a result to the set, unless it is already a member."""
        if result not in self.results:
            self.results.append(result)

    def update(self, results: Iterable[ResultBase]) -> None:
        """Add several results (those not already members)."""
        self.results.extend(r for r in results if r not in self.results)

    def remove(self, result: ResultBase | str) -> None:
        """Remove a member; ``KeyError`` when it is not one."""
        if isinstance(result, str):
            result = AsyncResult(result, self.app)
        try:
            self.results.remove(result)
        except ValueError:
            raise KeyError(result) from None

    def discard(self, result: ResultBase | str) -> None:
        """Remove a member if present."""
        try:
            self.remove(result)
        except KeyError:
            pass

    def clear(self) -> None:
        self.results.clear()

    # -- states ---------------------------------------------------------------------------

    def _states(self) -> list[str | None]:
        """Each member's state (None for a nested set), read in batches."""
        read = _prefetch(self.results)
        found: list[str | None] = []
        for result in self.results:
            if isinstance(result, ResultSet):
                found.append(None)
            elif type(result) is AsyncResult and result._cache is None and result.id in read:
                found.append(read[result.id]["status"])
            else:
                found.append(result.state)  # type: ignore[attr-defined]
        return found

    def ready(self) -> bool:
        """True when every member is ready (succeeded, failed or was revoked)."""
        return all(
            r.ready() if state is None else state in states.READY_STATES
            for r, state in zip(self.results, self._states(), strict=True)
        )

    def waiting(self) -> bool:
        """True while any member is not ready."""
        return not self.ready()

    def successful(self) -> bool:
        """True when every member succeeded."""
        return all(
            r.successful() if state is None else state == states.SUCCESS
            for r, state in zip(self.results, self._states(), strict=True)
        )

    def failed(self) -> bool:
        """True when any member failed."""
        return any(
            r.failed() if state is None else state == states.FAILURE
            for r, state in zip(self.results, self._states(), strict=True)
        )

    def completed_count(self) -> int:
        """How many members succeeded."""
        return sum(
            bool(r.successful() if state is None else state == states.SUCCESS)
            for r, state in zip(self.results, self._states(), strict=True)
        )

    # -- values ---------------------------------------------------------------------------

    def _describe(self) -> str:
        return repr(self)

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float | None = None,
        callback: Callable[[str, Any], Any] | None = None,
        disable_sync_subtasks: bool = True,
    ) -> list[Any]:
        """Wait for every member; return their values in member order.

        ``timeout`` bounds the whole wait, not each member's, and raises
        ``kernel.exceptions.TimeoutError`` naming the first member not ready. With
        ``propagate`` the first failed member (in order) raises its exception. With
        ``callback``, each ``(task_id, value)`` is passed to it instead of collected
        (the returned list is then empty). Members are read in batches of
        ``PREFETCH_BATCH``, so a 10,000-member group takes a few dozen requests when
        it is ready.
        """
        if disable_sync_subtasks:
            _refuse_sync_wait(self._describe())
        deadline = None if timeout is None else time.monotonic() + timeout
        values: list[Any] = []
        prefetched_until = 0
        for index, result in enumerate(self.results):
            if index >= prefetched_until:
                prefetched_until = index + PREFETCH_BATCH
                _prefetch(self.results[index:prefetched_until])
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                value = result.get(  # type: ignore[attr-defined]
                    timeout=remaining,
                    propagate=propagate,
                    interval=interval,
                    disable_sync_subtasks=False,
                )
            except TimeoutError:
                raise TimeoutError(
                    f"{self._describe()}: member {index + 1} of {len(self.results)} "
                    f"({result.id}) not ready after {timeout}s; raise the timeout, or check "
                    "a worker consumes its queue"
                ) from None
            if callback is not None:
                callback(result.id, value)  # type: ignore[arg-type]
            else:
                values.append(value)
        return values

    join = get
    join_native = get

    def forget(self) -> None:
        """Delete every member's stored result."""
        for result in self.results:
            result.forget()  # type: ignore[attr-defined]

    def _leaf_ids(self) -> list[str]:
        ids: list[str] = []
        for result in self.results:
            if isinstance(result, ResultSet):
                ids.extend(result._leaf_ids())
            else:
                ids.append(result.id)  # type: ignore[arg-type]
        return ids

    def revoke(
        self,
        connection: Any = None,
        terminate: bool = False,
        signal: str | int = "SIGTERM",
        wait: bool = False,
        timeout: float | None = None,
    ) -> list[dict] | None:
        """Revoke every member (those of nested groups too) in one broadcast.

        Same options as :meth:`AsyncResult.revoke`.
        """
        ids = self._leaf_ids()
        if not ids:
            return [] if wait else None
        return self.app.control.revoke(
            ids,
            terminate=terminate,
            signal=signal,
            connection=connection,
            reply=wait,
            timeout=1.0 if timeout is None else timeout,
        )

    # -- container --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[ResultBase]:
        return iter(self.results)

    def __getitem__(self, index: int) -> ResultBase:
        return self.results[index]

    def __contains__(self, result: object) -> bool:
        return result in self.results

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ResultSet) and not isinstance(other, GroupResult):
            return other.results == self.results
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: [{', '.join(str(r.id) for r in self.results)}]>"


class GroupResult(ResultSet):
    """The results of a group: a :class:`ResultSet` with the group's id.

    ``save()`` stores it in the backend (Celery's ``celery-taskset-meta-<id>``), so
    another process can ``GroupResult.restore(id, app=app)`` it.
    """

    def __init__(
        self,
        id: str | None = None,
        results: Iterable[ResultBase] | None = None,
        app: App | None = None,
        parent: ResultBase | None = None,
        backend: Any = None,
    ) -> None:
        super().__init__(results, app=app, backend=backend)
        self.id = None if id is None else str(id)
        self.parent = parent

    def _nodes_tuple(self) -> list:
        return [r.as_tuple() for r in self.results]

    def _describe(self) -> str:
        return f"group {self.id}"

    def save(self, backend: Any = None) -> GroupResult:
        """Store the group (its id and member ids) for ``restore``; returns itself."""
        (backend or self.backend).save_group(self.id, self)
        return self

    def delete(self, backend: Any = None) -> None:
        """Delete the saved group (not the members' results: see :meth:`forget`)."""
        (backend or self.backend).delete_group(self.id)

    @classmethod
    def restore(
        cls, group_id: str, app: App | None = None, backend: Any = None
    ) -> GroupResult | None:
        """The group saved under ``group_id``, or None if none is (or it expired)."""
        if backend is None:
            if app is None:
                raise TypeError(
                    f"GroupResult.restore({group_id!r}) needs app= or backend=: kernel has "
                    "no default app"
                )
            backend = app.backend
        return backend.restore_group(group_id)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GroupResult):
            return (
                other.id == self.id
                and other.results == self.results
                and other.parent == self.parent
            )
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(str(r.id) for r in self.results)}]>"

    def __str__(self) -> str:
        return str(self.id)


def result_from_tuple(value: Any, app: App) -> ResultBase:
    """Rebuild a result handle from its tuple form (lists from JSON accepted).

    ``value`` is ``((id, parent), nodes)``, where the first part may also be a bare
    id, and ``nodes`` (member tuples) makes it a :class:`GroupResult`. A bare id gives
    an :class:`AsyncResult`. Parents are rebuilt without recursion.
    """
    levels: list[tuple[str, Any]] = []
    base: ResultBase | None = None
    while value is not None:
        if isinstance(value, ResultBase):
            base = value
            break
        if isinstance(value, str):
            levels.append((value, None))
            break
        try:
            head, nodes = value
        except (TypeError, ValueError):
            raise ValueError(
                f"not a result tuple: {value!r}; expected ((id, parent), nodes) or an id"
            ) from None
        if isinstance(head, (list, tuple)):
            if not 1 <= len(head) <= 2:
                raise ValueError(f"not a result tuple: {value!r}; expected (id, parent) first")
            task_id, value = head[0], (head[1] if len(head) == 2 else None)
        else:
            task_id, value = head, None
        levels.append((str(task_id), nodes))
    result = base
    for task_id, nodes in reversed(levels):
        if nodes is not None:
            members = [result_from_tuple(node, app) for node in nodes]
            result = GroupResult(task_id, members, app=app, parent=result)
        else:
            result = AsyncResult(task_id, app, parent=result)
    if result is None:
        raise ValueError("not a result tuple: None")
    return result


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
