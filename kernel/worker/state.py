"""Worker state that outlives one message: the ids of revoked tasks.

A revoke is a broadcast: every running worker adds the ids to its
:class:`RevokedTasks` and discards those tasks when their messages arrive. The set
is bounded (``worker_revoked_max`` ids, oldest dropped first) and forgets an id
``worker_revoked_expires`` seconds after it was revoked, as Celery's worker does.

With ``kernel worker --statedb PATH`` (setting ``worker_state_db``) the set is kept
in a small SQLite file, so a restarted worker still refuses tasks revoked before it
stopped. Revokes are rare, so each one is written at once; nothing is lost when the
worker is killed.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from kernel.exceptions import ConfigurationError

log = logging.getLogger(__name__)

DEFAULT_MAX_SIZE = 50_000
DEFAULT_EXPIRES = 3 * 60 * 60.0

#: ``PRAGMA user_version`` of a state file written by this version.
STATE_DB_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kernel_revoked (task_id TEXT PRIMARY KEY, revoked_at REAL NOT NULL)"
)


class RevokedTasks:
    """An ordered, bounded set of revoked task ids whose entries expire.

    ``max_size`` ids at most (adding more drops the oldest); an id is forgotten
    ``expires`` seconds after its (latest) revoke. ``path`` names a state file that
    is read now and written on every :meth:`add`; ``None`` keeps the set in memory.
    Safe to use from several threads.
    """

    def __init__(
        self,
        max_size: int = DEFAULT_MAX_SIZE,
        expires: float | None = DEFAULT_EXPIRES,
        path: str | os.PathLike | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_size < 1:
            raise ConfigurationError(f"worker_revoked_max must be at least 1, got {max_size!r}")
        if expires is not None and expires <= 0:
            raise ConfigurationError(
                f"worker_revoked_expires must be a positive number of seconds or None, "
                f"got {expires!r}"
            )
        self.max_size = int(max_size)
        self.expires = expires
        self.path = os.fspath(path) if path is not None else None
        self._clock = clock
        self._lock = threading.Lock()
        #: task id -> epoch seconds of its latest revoke, oldest first.
        self._entries: OrderedDict[str, float] = OrderedDict()
        self._db: sqlite3.Connection | None = None
        if self.path is not None:
            self._db = _open_state_db(self.path)
            self._load()

    @classmethod
    def from_conf(cls, conf: Any, path: str | os.PathLike | None = None) -> RevokedTasks:
        """Built from an app's settings; ``path`` (``--statedb``) overrides ``worker_state_db``."""
        return cls(
            max_size=conf.worker_revoked_max,
            expires=conf.worker_revoked_expires,
            path=path if path is not None else conf.worker_state_db,
        )

    # ----------------------------------------------------------------- the set

    def add(self, task_ids: str | Iterable[str]) -> list[str]:
        """Record ``task_ids`` (one id or several) as revoked now; returns them as a list.

        An id revoked again moves to the newest end and its expiry starts over.
        """
        ids = _as_id_list(task_ids)
        if not ids:
            return []
        with self._lock:
            now = self._clock()
            for task_id in ids:
                self._entries.pop(task_id, None)
                self._entries[task_id] = now
            dropped = self._prune(now)
            self._write(ids, now, dropped)
        return ids

    def __contains__(self, task_id: object) -> bool:
        with self._lock:
            revoked_at = self._entries.get(task_id)  # type: ignore[call-overload]
            return revoked_at is not None and not self._expired(revoked_at, self._clock())

    def __len__(self) -> int:
        with self._lock:
            self._prune(self._clock())
            return len(self._entries)

    def ids(self) -> list[str]:
        """The revoked ids still remembered, oldest first."""
        with self._lock:
            self._prune(self._clock())
            return list(self._entries)

    def __iter__(self):  # noqa: ANN204 - an iterator over a snapshot
        return iter(self.ids())

    def __repr__(self) -> str:
        where = f" in {self.path}" if self.path else ""
        return f"<RevokedTasks: {len(self._entries)} ids{where}>"

    def _expired(self, revoked_at: float, now: float) -> bool:
        return self.expires is not None and now - revoked_at >= self.expires

    def _prune(self, now: float) -> list[str]:
        """Drop expired ids and those over ``max_size`` (oldest first); returns them."""
        dropped = []
        entries = self._entries
        while entries:
            task_id, revoked_at = next(iter(entries.items()))
            if len(entries) <= self.max_size and not self._expired(revoked_at, now):
                break
            entries.popitem(last=False)
            dropped.append(task_id)
        return dropped

    # ----------------------------------------------------------------- the state file

    def _load(self) -> None:
        assert self._db is not None
        now = self._clock()
        try:
            rows = self._db.execute(
                "SELECT task_id, revoked_at FROM kernel_revoked ORDER BY revoked_at, rowid"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise _state_db_error(self.path, exc) from exc
        for task_id, revoked_at in rows:
            self._entries[task_id] = float(revoked_at)
        dropped = self._prune(now)
        if dropped:
            self._write([], now, dropped)
        log.info("loaded %d revoked task id(s) from %s", len(self._entries), self.path)

    def _write(self, added: list[str], now: float, dropped: list[str]) -> None:
        if self._db is None:
            return
        gone = [(task_id,) for task_id in dropped if task_id not in self._entries]
        try:
            with self._db:  # one transaction
                if gone:
                    self._db.executemany("DELETE FROM kernel_revoked WHERE task_id = ?", gone)
                self._db.executemany(
                    "INSERT OR REPLACE INTO kernel_revoked (task_id, revoked_at) VALUES (?, ?)",
                    [(task_id, now) for task_id in added if task_id in self._entries],
                )
        except sqlite3.Error as exc:
            # The ids are revoked in this process all the same; only a restart forgets them.
            log.error(
                "could not save %d revoked task id(s) to the state file %s: %s; they are "
                "revoked until this worker stops, but a restart will not remember them",
                len(added),
                self.path,
                exc,
            )

    def close(self) -> None:
        """Drop expired ids from the state file and close it (the set stays usable)."""
        with self._lock:
            if self._db is None:
                return
            dropped = self._prune(self._clock())
            self._write([], self._clock(), dropped)
            self._db.close()
            self._db = None


def _as_id_list(task_ids: str | Iterable[str]) -> list[str]:
    """One id or several, as a list of strings without repeats (order kept)."""
    if isinstance(task_ids, (str, bytes)):
        task_ids = [task_ids]
    ids: dict[str, None] = {}
    for task_id in task_ids:
        if isinstance(task_id, bytes):
            task_id = task_id.decode()
        if not isinstance(task_id, str) or not task_id:
            raise TypeError(f"a task id must be a non-empty string, got {task_id!r}")
        ids[task_id] = None
    return list(ids)


def _state_db_error(path: str | None, exc: BaseException) -> ConfigurationError:
    hint = "give a writable file path (its directory must exist)"
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
        hint = (
            "the file is not a kernel state database (a Celery --statedb file has "
            "another format); give a new path"
        )
    return ConfigurationError(
        f"cannot open the worker state file {path!r} (--statedb / worker_state_db): {exc}; {hint}"
    )


def _open_state_db(path: str) -> sqlite3.Connection:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise _state_db_error(path, FileNotFoundError(f"directory {directory!r} does not exist"))
    try:
        db = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _state_db_error(path, exc) from exc
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > STATE_DB_VERSION:
            raise ConfigurationError(
                f"the worker state file {path!r} was written by a newer kernel (format "
                f"{version}, this one reads {STATE_DB_VERSION}); upgrade, or give a new path"
            )
        with db:
            db.execute(_SCHEMA)
            if version != STATE_DB_VERSION:
                db.execute(f"PRAGMA user_version = {STATE_DB_VERSION}")
    except sqlite3.Error as exc:
        db.close()
        raise _state_db_error(path, exc) from exc
    except BaseException:
        db.close()
        raise
    return db
