"""``cache+memory://``: results kept in this process only (tests, eager mode).

All apps in one process that use the same URL share one store, as with Celery's
``cache+memory://``; nothing crosses to other processes.
"""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

from kernel.backends.base import KeyValueBackend


class MemoryBackend(KeyValueBackend):
    """A dict guarded by a lock; expiry checked on read. Sets (chord parts) are Python
    sets in the same dict, so chords work within one process."""

    _stores: ClassVar[dict[str, dict[str, tuple[Any, float | None]]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, app: Any, url: str) -> None:
        super().__init__(app, url)
        with self._lock:
            self._store = self._stores.setdefault(url, {})

    def get(self, key: str) -> Any:
        with self._lock:
            return self._live(key, time.time())

    def set(self, key: str, value: Any, expires: float | None) -> None:
        with self._lock:
            self._store[key] = (value, time.time() + expires if expires else None)

    def delete(self, key: str) -> None:
        with self._lock:
            self._store.pop(key, None)

    def _live(self, key: str, now: float) -> Any:
        """The unexpired value under ``key`` (lock held), else None."""
        entry = self._store.get(key)
        if entry is None:
            return None
        value, expires_at = entry
        if expires_at is not None and expires_at <= now:
            del self._store[key]
            return None
        return value

    def add_to_set(self, key: str, member: str, expires: float | None) -> int:
        now = time.time()
        with self._lock:
            members = self._live(key, now)
            if not isinstance(members, set):
                members = set()
            members.add(member)
            self._store[key] = (members, now + expires if expires else None)
            return len(members)

    def set_if_absent(self, key: str, value: Any, expires: float | None) -> bool:
        now = time.time()
        with self._lock:
            if self._live(key, now) is not None:
                return False
            self._store[key] = (value, now + expires if expires else None)
            return True

    def cleanup(self) -> int:
        now = time.time()
        with self._lock:
            expired = [k for k, (_v, t) in self._store.items() if t is not None and t <= now]
            for key in expired:
                del self._store[key]
        return len(expired)

    def clear(self) -> None:
        """Forget every result in this store (test isolation)."""
        with self._lock:
            self._store.clear()
