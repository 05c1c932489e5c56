"""The results an rpc:// client has received: the latest state of each task.

A result message is read once, so its content must be kept in memory until the client
asks for it. Entries expire ``result_expires`` seconds after they arrived, and at most
``capacity`` are kept (oldest dropped first). Threads waiting for a result block on
:meth:`ResultCache.wait`, which every new arrival wakes.

Which state wins: a later message replaces an earlier one, except that a state that
is not final (STARTED, RETRY, PROGRESS) never replaces a final one (SUCCESS, FAILURE,
REVOKED). Messages of one task may come from different workers, whose messages are not
ordered with each other, so a late RETRY can arrive after the retried run's SUCCESS.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from kernel import states

#: Results kept at most by one client process.
DEFAULT_CAPACITY = 100_000


class ResultCache:
    """Latest result document per task id, with expiry; thread-safe."""

    def __init__(self, expires: float | None, capacity: int = DEFAULT_CAPACITY) -> None:
        self.expires = expires
        self.capacity = capacity
        self._changed = threading.Condition()
        self._entries: OrderedDict[str, tuple[dict, float | None]] = OrderedDict()
        self._groups: dict[str, tuple[Any, float | None]] = {}

    def _deadline(self) -> float | None:
        return None if self.expires is None else time.monotonic() + self.expires

    def put(self, meta: dict) -> None:
        task_id = meta["task_id"]
        with self._changed:
            current = self._live(task_id)
            if (
                current is not None
                and current["status"] in states.READY_STATES
                and meta["status"] not in states.READY_STATES
            ):
                return
            self._entries[task_id] = (meta, self._deadline())
            self._entries.move_to_end(task_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            self._changed.notify_all()

    def get(self, task_id: str) -> dict | None:
        with self._changed:
            return self._live(task_id)

    def _live(self, task_id: str) -> dict | None:
        entry = self._entries.get(task_id)
        if entry is None:
            return None
        meta, deadline = entry
        if deadline is not None and deadline <= time.monotonic():
            del self._entries[task_id]
            return None
        return meta

    def forget(self, task_id: str) -> None:
        with self._changed:
            self._entries.pop(task_id, None)

    def wait(self, timeout: float) -> None:
        """Block until a result arrives (or :meth:`wake`), at most ``timeout`` seconds."""
        with self._changed:
            self._changed.wait(max(0.0, timeout))

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def prune(self) -> int:
        """Drop expired entries; how many went."""
        now = time.monotonic()
        with self._changed:
            expired = [
                key
                for key, (_meta, deadline) in self._entries.items()
                if deadline is not None and deadline <= now
            ]
            for key in expired:
                del self._entries[key]
            groups = [
                key
                for key, (_value, deadline) in self._groups.items()
                if deadline is not None and deadline <= now
            ]
            for key in groups:
                del self._groups[key]
        return len(expired)

    # -- saved groups (this process only) ---------------------------------------------

    def save_group(self, group_id: str, value: Any) -> None:
        with self._changed:
            self._groups[group_id] = (value, self._deadline())

    def group(self, group_id: str) -> Any:
        with self._changed:
            entry = self._groups.get(group_id)
            if entry is None:
                return None
            value, deadline = entry
            if deadline is not None and deadline <= time.monotonic():
                del self._groups[group_id]
                return None
            return value

    def delete_group(self, group_id: str) -> None:
        with self._changed:
            self._groups.pop(group_id, None)
