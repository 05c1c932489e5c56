"""The result backend interface, and a key-value base most backends only fill in.

A plugin's ``BackendSpec.factory(app, url)`` returns a :class:`Backend`. Key-value
stores subclass :class:`KeyValueBackend` and implement ``get``/``set``/``delete``;
everything else (documents, serialization, waiting, groups) is shared. Implementing
the two atomic primitives ``add_to_set`` and ``set_if_absent`` as well gives chords.

Chords (a group of header tasks whose results feed one body task) synchronise through
the backend, in two calls:

1. the client calls :meth:`Backend.apply_chord` before it sends any header task;
2. the worker that stored a header task's final state calls
   :meth:`Backend.on_chord_part_return`; the call that completes the chord sends the
   body with the header's values in order, or fails it with a ``ChordError``.
"""

from __future__ import annotations

import logging
import time
import traceback as traceback_module
from collections.abc import Sequence
from typing import Any

from kombu.serialization import dumps, loads

from kernel import states
from kernel.backends import document
from kernel.exceptions import ChordError, ConfigurationError, TimeoutError
from kernel.polling import Backoff
from kernel.result import AsyncResult, GroupResult, ResultBase, ResultSet, result_from_tuple

log = logging.getLogger(__name__)


class Backend:
    """What the kernel needs from a result store."""

    #: Seconds between polls in ``wait_for`` when the caller gives no interval.
    default_interval = 0.05
    #: True when :meth:`apply_chord` and :meth:`on_chord_part_return` work.
    supports_chords: bool = False

    def __init__(self, app: Any, url: str) -> None:
        self.app = app
        self.url = url

    def _unsupported(self, what: str) -> NotImplementedError:
        from kernel.plugins.manager import redact_url

        return NotImplementedError(
            f"the result backend {redact_url(self.url)!r} ({type(self).__name__}) "
            f"cannot {what}; use one that can: the builtin SQLite backend "
            "(result_backend='sqlite:///kernel.sqlite3'), or the Redis or SQL plugin"
        )

    # -- storing ---------------------------------------------------------------------

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
    ) -> dict:
        raise NotImplementedError

    @staticmethod
    def prepare_value(result: Any) -> Any:
        """What is stored for a task's return value: a returned result handle (a group
        a task started, say) is stored as its tuple, like Celery."""
        if isinstance(result, ResultBase):
            return result.as_tuple()
        return result

    def mark_as_started(self, task_id: str, meta: dict | None = None, request: Any = None) -> dict:
        """Store STARTED; ``request`` (the task's ``Context``) lets ``result_extended``
        record the task's name and arguments while it runs, as Celery does."""
        return self.store_result(task_id, meta or {}, states.STARTED, request=request)

    def mark_as_done(self, task_id: str, result: Any, request: Any = None) -> dict:
        return self.store_result(task_id, result, states.SUCCESS, request=request)

    def mark_as_failure(
        self, task_id: str, exc: BaseException, traceback: str | None = None, request: Any = None
    ) -> dict:
        return self.store_result(task_id, exc, states.FAILURE, traceback, request)

    def mark_as_revoked(self, task_id: str, reason: str = "revoked", request: Any = None) -> dict:
        from kernel.exceptions import TaskRevokedError

        return self.store_result(task_id, TaskRevokedError(reason), states.REVOKED, request=request)

    # -- reading ---------------------------------------------------------------------

    def get_task_meta(self, task_id: str) -> dict:
        raise NotImplementedError

    def get_task_metas(self, task_ids: Sequence[str]) -> list[dict]:
        """The documents of several tasks, in the order given (PENDING when unknown).

        Override when the store can read many keys in one request: groups are read
        through it.
        """
        return [self.get_task_meta(task_id) for task_id in task_ids]

    def wait_for(
        self, task_id: str, timeout: float | None = None, interval: float | None = None
    ) -> dict:
        """Poll until the task is ready; raise TimeoutError after ``timeout`` seconds.

        Polls every ``interval`` seconds when given; otherwise 1 ms after the first
        read, doubling up to :attr:`default_interval` (a short task's result is read
        within about a millisecond of being stored, a long one costs no more reads)."""
        if interval is None:
            pauses = Backoff(self.default_interval)
        else:
            pauses = Backoff(interval, first=interval)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            meta = self.get_task_meta(task_id)
            if meta["status"] in states.READY_STATES:
                return meta
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"task {task_id} still {meta['status']} after {timeout}s; "
                    "raise the timeout, or check a worker consumes its queue"
                )
            pause = pauses.next()
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(pause)

    def forget(self, task_id: str) -> None:
        raise NotImplementedError

    def cleanup(self) -> int:
        """Delete the results and saved groups older than ``result_expires``; return
        how many were deleted.

        Run by ``kernel cleanup`` and by the builtin task ``celery.backend_cleanup``
        (Celery's name, for a periodic schedule). A backend whose store drops expired
        entries by itself (Redis keys with a TTL) keeps this default, which deletes
        nothing and returns 0; backends that keep rows until asked (SQL, SQLite) must
        override it, and must delete nothing when ``result_expires`` is None.
        """
        return 0

    def close(self) -> None:
        """Release connections; the backend may be used again afterwards."""

    # -- groups ------------------------------------------------------------------------

    def save_group(self, group_id: str, group_result: GroupResult) -> GroupResult:
        """Store a group's member ids so ``restore_group`` finds them; returns it."""
        raise self._unsupported("save groups")

    def restore_group(self, group_id: str) -> GroupResult | None:
        """The group saved under ``group_id``, or None (never saved, expired, deleted)."""
        raise self._unsupported("restore groups")

    def delete_group(self, group_id: str) -> None:
        """Delete a saved group (its members' results stay)."""
        raise self._unsupported("delete groups")

    # -- chords ------------------------------------------------------------------------

    def ensure_chords_supported(self, what: str = "chord") -> None:
        """Raise ``ConfigurationError`` unless this backend can synchronise chords.

        Called before anything of a chord is sent, so an unsupported backend fails
        at once instead of leaving the body waiting for ever.
        """
        if self.supports_chords:
            return
        from kernel.plugins.manager import redact_url

        raise ConfigurationError(
            f"{what} needs a result backend that supports chords, and "
            f"{redact_url(self.url)!r} ({type(self).__name__}) does not; set "
            "result_backend to one that does: the builtin SQLite backend "
            "('sqlite:///kernel.sqlite3'), or the Redis or SQL backend plugin"
        )

    def apply_chord(self, group_id: str, header_ids: Sequence[str] | ResultSet, body: dict) -> None:
        """Prepare the chord ``group_id`` before its header tasks are sent.

        ``header_ids``: the header tasks' ids in order, or the header's GroupResult.
        """
        self.ensure_chords_supported()
        raise self._unsupported("run chords")

    def on_chord_part_return(self, request: Any, state: str, result: Any) -> None:
        """A header task of the chord ``request.group`` reached a final ``state``."""
        raise self._unsupported("run chords")


class KeyValueBackend(Backend):
    """A backend over a key-value store; subclasses implement the primitives.

    ``get``, ``set`` and ``delete`` are required. ``add_to_set`` and
    ``set_if_absent`` (both atomic, also across processes when the store is shared)
    are optional; implementing both gives chord support.
    """

    #: Seconds the worker completing a chord holds it before the body is sent; if
    #: that worker dies meanwhile, a redelivered header task may fire the chord
    #: after this long.
    chord_claim_timeout: float = 10.0

    def get(self, key: str) -> bytes | str | None:
        raise NotImplementedError

    def set(self, key: str, value: bytes | str, expires: float | None) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def mget(self, keys: Sequence[str]) -> list[bytes | str | None]:
        """The values of several keys, in order; override to read them in one request."""
        return [self.get(key) for key in keys]

    def add_to_set(self, key: str, member: str, expires: float | None) -> int:
        """Atomically add ``member`` to the set under ``key``; return the set's size.

        Adding a member that is already there leaves the size unchanged. The set
        expires ``expires`` seconds after the last addition (None: never).
        """
        raise self._unsupported("count chord parts (add_to_set)")

    def set_if_absent(self, key: str, value: bytes | str, expires: float | None) -> bool:
        """Atomically store ``value`` unless ``key`` holds an unexpired value; True if
        it was stored."""
        raise self._unsupported("claim chords (set_if_absent)")

    def delete_set(self, key: str) -> None:
        """Delete the set under ``key``; override if sets live apart from values."""
        self.delete(key)

    @property
    def supports_chords(self) -> bool:  # type: ignore[override]
        """True when the subclass implements ``add_to_set`` and ``set_if_absent``."""
        cls = type(self)
        return (
            cls.add_to_set is not KeyValueBackend.add_to_set
            and cls.set_if_absent is not KeyValueBackend.set_if_absent
        )

    # -- shared behaviour --------------------------------------------------------------

    @property
    def expires(self) -> float | None:
        return self.app.conf.result_expires

    def _encode(self, meta: dict) -> bytes | str:
        _content_type, _encoding, data = dumps(meta, serializer=self.app.conf.result_serializer)
        return data

    def _decode(self, data: bytes | str) -> dict:
        serializer = self.app.serialization.serializer_spec(self.app.conf.result_serializer)
        accept = self.app.conf.result_accept_content or self.app.conf.accept_content
        return loads(
            data,
            serializer.content_type,
            serializer.content_encoding,
            accept=self.app.serialization.accepted_types(accept),
        )

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
    ) -> dict:
        children = list(getattr(request, "children", None) or [])
        extra = extended_fields(request) if self.app.conf.result_extended else None
        meta = document.build(
            task_id, state, self.prepare_value(result), traceback, children, extra
        )
        self.set(document.result_key(task_id), self._encode(meta), self.expires)
        return meta

    def get_task_meta(self, task_id: str) -> dict:
        data = self.get(document.result_key(task_id))
        if data is None:
            return document.pending(task_id)
        return self._decode(data)

    def get_task_metas(self, task_ids: Sequence[str]) -> list[dict]:
        values = self.mget([document.result_key(task_id) for task_id in task_ids])
        return [
            document.pending(task_id) if data is None else self._decode(data)
            for task_id, data in zip(task_ids, values, strict=True)
        ]

    def forget(self, task_id: str) -> None:
        self.delete(document.result_key(task_id))

    # -- groups ------------------------------------------------------------------------

    def save_group(self, group_id: str, group_result: GroupResult) -> GroupResult:
        """Store ``{"result": <group tuple>}`` under ``celery-taskset-meta-<id>``, as
        Celery's key-value backends do; it expires after ``result_expires``."""
        data = self._encode({"result": group_result.as_tuple()})
        self.set(document.group_key(group_id), data, self.expires)
        return group_result

    def restore_group(self, group_id: str) -> GroupResult | None:
        data = self.get(document.group_key(group_id))
        if data is None:
            return None
        restored = result_from_tuple(self._decode(data)["result"], self.app)
        if not isinstance(restored, GroupResult):
            restored = GroupResult(restored.id, [restored], app=self.app)
        restored._backend = self
        return restored

    def delete_group(self, group_id: str) -> None:
        self.delete(document.group_key(group_id))

    # -- chords ------------------------------------------------------------------------

    def apply_chord(self, group_id: str, header_ids: Sequence[str] | ResultSet, body: dict) -> None:
        """Save the header as a group (member order) and the chord's size.

        ``header_ids`` may be the header's ``GroupResult`` instead of its ids: a
        member that is itself a group then counts its own members, and gives the
        body a list of their values.
        """
        self.ensure_chords_supported()
        if isinstance(header_ids, ResultSet):
            members = list(header_ids.results)
        else:
            members = [AsyncResult(i, self.app, backend=self) for i in header_ids]
        header = GroupResult(group_id, members, app=self.app)
        self.save_group(group_id, header)
        self.set(document.chord_size_key(group_id), str(len(header._leaf_ids())), self.expires)

    def on_chord_part_return(self, request: Any, state: str, result: Any) -> None:
        """Count the header task ``request.id``; the last one to finish sends the body.

        However many workers report at once and however often a header task is
        redelivered, the body is sent once while workers live: each part is added to a
        set (a second report of the same task does not grow it), and the report that
        sees the set complete must also claim the chord (set-if-absent, expiring after
        ``chord_claim_timeout``) before it fires, then marks it done. A report that
        finds the chord claimed but not done waits for the claimer; if the claim
        expires first (its worker died before sending the body), this report — the
        redelivered task of the dead worker, typically — fires the chord instead, so
        the body is never lost. A worker dying between sending the body and marking
        the chord done can make it run twice (at least once, never lost).
        """
        group_id = getattr(request, "group", None)
        body = getattr(request, "chord", None)
        if not group_id or not body:
            return
        claim_key = document.chord_claim_key(group_id)
        if self.get(claim_key) is not None and self._claim_outcome(claim_key) == "done":
            log.info(
                "chord %s: header task %s reported after the chord fired (a redelivered "
                "task); ignored",
                group_id,
                request.id,
            )
            return
        size = self._chord_size(group_id, body)
        if size is None:
            self._on_missing_group(request, group_id, body)
            return
        finished = self.add_to_set(document.chord_parts_key(group_id), request.id, self.expires)
        if finished < size:
            return
        if not self.set_if_absent(claim_key, "claimed", self.chord_claim_timeout):
            return  # another report completed the chord at the same time
        self._fire_chord(request, group_id, body)
        self.set(claim_key, "done", self.expires)
        self.delete_group(group_id)
        self.delete(document.chord_size_key(group_id))
        self.delete_set(document.chord_parts_key(group_id))

    def _chord_size(self, group_id: str, body: dict) -> int | None:
        """The number of header tasks, from the body (Celery's ``chord_size``), the
        size ``apply_chord`` stored, or the saved group; None when none is known."""
        size = body.get("chord_size") if isinstance(body, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
        stored = self.get(document.chord_size_key(group_id))
        if stored is not None:
            return int(stored.decode() if isinstance(stored, bytes) else stored)
        group = self.restore_group(group_id)
        return None if group is None else len(group._leaf_ids())

    def _on_missing_group(self, request: Any, group_id: str, body: dict) -> None:
        if self.get(document.chord_claim_key(group_id)) is not None:
            return  # fired and cleaned up between our two reads: a late duplicate
        body_id = (body.get("options") or {}).get("task_id")
        log.error(
            "chord %s: header task %s finished, but GroupResult %s no longer exists "
            "(expired after result_expires, deleted, or the chord was not sent through "
            "this backend); failing the body %s",
            group_id,
            request.id,
            group_id,
            body_id,
        )
        if body_id and self.get_task_meta(body_id)["status"] in states.READY_STATES:
            return  # the body already has its outcome: keep it
        self._fail_chord(request, body, ChordError(f"GroupResult {group_id} no longer exists"))

    def _claim_outcome(self, claim_key: str) -> str:
        """Wait while another worker holds the chord's claim: "done" when it fired the
        chord, "free" when the claim expired (that worker died) or never existed."""
        deadline = time.monotonic() + self.chord_claim_timeout + 1.0
        while True:
            value = self.get(claim_key)
            if value is None:
                return "free"
            if (value.decode() if isinstance(value, bytes) else str(value)) == "done":
                return "done"
            if time.monotonic() >= deadline:
                return "free"
            time.sleep(0.05)

    def _fire_chord(self, request: Any, group_id: str, body: dict) -> None:
        group = self.restore_group(group_id)
        if group is None:
            self._fail_chord(request, body, ChordError(f"GroupResult {group_id} no longer exists"))
            return
        leaf_ids = group._leaf_ids()
        metas = dict(zip(leaf_ids, self.get_task_metas(leaf_ids), strict=True))
        for task_id in leaf_ids:  # the first failed member, in member order, is named
            meta = metas[task_id]
            if meta["status"] in states.PROPAGATE_STATES:
                exc = document.result_value(meta)
                error = ChordError(f"Dependency {task_id} raised {exc!r}")
                if isinstance(exc, BaseException):
                    error.__cause__ = exc
                self._fail_chord(request, body, error, meta.get("traceback"))
                return
            if meta["status"] not in states.READY_STATES:
                error = ChordError(
                    f"Dependency {task_id} has no stored result (state {meta['status']}); "
                    "a chord's header tasks must store their results (ignore_result=False)"
                )
                self._fail_chord(request, body, error)
                return
        values = _chord_values(group, metas)
        from kernel.canvas import maybe_signature

        try:
            maybe_signature(body, self.app).apply_async(
                (values,), parent_id=request.id, root_id=request.root_id or request.id
            )
        except Exception as exc:
            log.exception("chord %s: could not send its body", group_id)
            error = ChordError(f"Callback error: {exc!r}")
            error.__cause__ = exc
            self._fail_chord(request, body, error, traceback_module.format_exc())

    def _fail_chord(
        self, request: Any, body: dict, error: ChordError, cause_traceback: str | None = None
    ) -> None:
        """Store ``error`` as the body's failure (and that of the tasks that would have
        followed it), then send the body's errbacks with the body's id."""
        options = body.get("options") or {}
        body_id = options.get("task_id")
        text = "".join(traceback_module.format_exception_only(type(error), error))
        if cause_traceback:
            text = (
                f"{cause_traceback.rstrip()}\n\nThe above exception was the direct cause "
                f"of the following exception:\n\n{text}"
            )
        for task_id in _body_task_ids(body):
            self.mark_as_failure(task_id, error, text)
        if not body_id:
            log.error(
                "chord %s: %s; its body %s has no task id to store the failure under",
                request.group,
                error,
                body.get("task"),
            )
        errbacks = options.get("link_error") or []
        if isinstance(errbacks, dict):
            errbacks = [errbacks]
        if not errbacks:
            return
        from kernel.task import Context
        from kernel.worker.execute import run_errbacks

        # The same rule as for a task's own errbacks: (request, ChordError, traceback)
        # in this process when the errback takes it, else sent with the body's id.
        body_request = Context(
            id=body_id,
            task=body.get("task"),
            args=tuple(body.get("args") or ()),
            kwargs=dict(body.get("kwargs") or {}),
            called_directly=False,
            root_id=getattr(request, "root_id", None),
            parent_id=getattr(request, "id", None),
            group=options.get("group_id"),
            errbacks=list(errbacks),
        )
        run_errbacks(self.app, body_request, error, text)


def extended_fields(request: Any) -> dict[str, Any] | None:
    """What ``result_extended`` adds to a stored result, from the task's request (None
    when there is no request): Celery's names and meanings, ``queue`` being the
    routing key the message arrived with."""
    if request is None:
        return None
    delivery_info = getattr(request, "delivery_info", None) or {}
    args = getattr(request, "args", None)
    kwargs = getattr(request, "kwargs", None)
    return {
        "name": getattr(request, "task", None),
        "args": list(args) if args is not None else None,
        "kwargs": dict(kwargs) if kwargs is not None else None,
        "worker": getattr(request, "hostname", None),
        "retries": getattr(request, "retries", None),
        "queue": delivery_info.get("routing_key"),
    }


def _chord_values(group: ResultSet, metas: dict[str, dict]) -> list[Any]:
    """The members' values in member order; a nested group gives a list."""
    return [
        _chord_values(member, metas)
        if isinstance(member, ResultSet)
        else document.result_value(metas[member.id])  # type: ignore[index]
        for member in group.results
    ]


def _body_task_ids(body: Any) -> list[str]:
    """Ids a failed chord's body stands for: the body, the members of a group or
    chain body, and the steps chained after it (so none of them waits for ever)."""
    if not isinstance(body, dict):
        return []
    options = body.get("options") or {}
    ids: list[str] = [options["task_id"]] if options.get("task_id") else []
    nested = []
    if body.get("subtask_type") in ("group", "chain"):
        nested.extend((body.get("kwargs") or {}).get("tasks") or [])
    nested.extend(options.get("chain") or [])
    for signature in nested:
        ids.extend(_body_task_ids(signature))
    return list(dict.fromkeys(ids))
