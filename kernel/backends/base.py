"""The result backend interface, and a key-value base most backends only fill in.

A plugin's ``BackendSpec.factory(app, url)`` returns a :class:`Backend`. Key-value
stores subclass :class:`KeyValueBackend` and implement ``get``/``set``/``delete``;
everything else (documents, serialization, waiting) is shared.
"""

from __future__ import annotations

import time
from typing import Any

from kombu.serialization import dumps, loads

from kernel import states
from kernel.backends import document
from kernel.exceptions import TimeoutError


class Backend:
    """What the kernel needs from a result store."""

    #: Seconds between polls in ``wait_for`` when the caller gives no interval.
    default_interval = 0.05

    def __init__(self, app: Any, url: str) -> None:
        self.app = app
        self.url = url

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

    def mark_as_started(self, task_id: str, meta: dict | None = None) -> dict:
        return self.store_result(task_id, meta or {}, states.STARTED)

    def mark_as_done(self, task_id: str, result: Any, request: Any = None) -> dict:
        return self.store_result(task_id, result, states.SUCCESS, request=request)

    def mark_as_failure(
        self, task_id: str, exc: BaseException, traceback: str | None = None, request: Any = None
    ) -> dict:
        return self.store_result(task_id, exc, states.FAILURE, traceback, request)

    def mark_as_revoked(self, task_id: str, reason: str = "revoked") -> dict:
        from kernel.exceptions import TaskRevokedError

        return self.store_result(task_id, TaskRevokedError(reason), states.REVOKED)

    # -- reading ---------------------------------------------------------------------

    def get_task_meta(self, task_id: str) -> dict:
        raise NotImplementedError

    def wait_for(
        self, task_id: str, timeout: float | None = None, interval: float | None = None
    ) -> dict:
        """Poll until the task is ready; raise TimeoutError after ``timeout`` seconds."""
        interval = self.default_interval if interval is None else interval
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
            time.sleep(interval)

    def forget(self, task_id: str) -> None:
        raise NotImplementedError

    def cleanup(self) -> int:
        """Delete expired results; returns how many. Optional."""
        return 0

    def close(self) -> None:
        """Release connections; the backend may be used again afterwards."""


class KeyValueBackend(Backend):
    """A backend over a key-value store; subclasses implement the four primitives."""

    def get(self, key: str) -> bytes | str | None:
        raise NotImplementedError

    def set(self, key: str, value: bytes | str, expires: float | None) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

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
        meta = document.build(task_id, state, result, traceback, children)
        self.set(document.result_key(task_id), self._encode(meta), self.expires)
        return meta

    def get_task_meta(self, task_id: str) -> dict:
        data = self.get(document.result_key(task_id))
        if data is None:
            return document.pending(task_id)
        return self._decode(data)

    def forget(self, task_id: str) -> None:
        self.delete(document.result_key(task_id))
