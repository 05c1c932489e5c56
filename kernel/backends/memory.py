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
    """A dict guarded by a lock; expiry checked on read."""

    _stores: ClassVar[dict[str, dict[str, tuple[Any, float | None]]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, app: Any, url: str) -> None:
        super().__init__(app, url)
        with self._lock:
            self._store = self._stores.setdefault(url, {})

    def get(self, key: str) -> Any:
        with self._lock:
            entry = self._store.get(key)
            if entry is None:
                return None
            value, expires_at = entry
            if expires_at is not None and expires_at <= time.time():
                del self._store[key]
                return None
            return value

    def set(self, key: str, value: Any, expires: float | None) -> None:
        with self._lock:
            self._store[key] = (value, time.time() + expires if expires else None)

    def delete(self, key: str) -> None:
        with self._lock:
            self._store.pop(key, None)

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
