"""Per-task-type rate limits in a worker: token buckets and the tasks waiting on them.

``rate_limit="10/s"`` (or ``"100/m"``, ``"1000/h"``, or a number meaning per second)
lets each worker start at most that many tasks of the type, with bursts up to one
second's worth of tokens (at least one). Tasks waiting for a token wait here, per
type, so they never hold back tasks of other types.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from kombu.utils.limits import TokenBucket

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*$")


def parse_rate(rate: Any) -> float | None:
    """Tasks per second for ``rate`` ("10/s", "100/m", "1000/h", 5); None or 0: no limit."""
    if rate is None or rate == "":
        return None
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        value = float(rate)
    else:
        match = _RATE.match(str(rate))
        if not match:
            raise ValueError(
                f"invalid rate limit {rate!r}: use a number of tasks per second or "
                "'<n>/s', '<n>/m' or '<n>/h', e.g. '10/s' or '100/m'"
            )
        value = float(match.group(1)) / _UNITS[match.group(2) or "s"]
    if value < 0:
        raise ValueError(f"invalid rate limit {rate!r}: it cannot be negative")
    return value or None


class RateLimiter:
    """Token buckets per task name and the messages waiting for their tokens."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket | None] = {}
        self._waiting: dict[str, deque] = {}

    def configure(self, name: str, rate: Any) -> float | None:
        """Set (or with None, remove) the limit of task ``name``; returns tasks/second."""
        per_second = parse_rate(rate)
        self._buckets[name] = (
            TokenBucket(per_second, capacity=max(1.0, per_second)) if per_second else None
        )
        return per_second

    def limited(self, name: str) -> bool:
        return self._buckets.get(name) is not None

    def admit(self, name: str, item: Any) -> bool:
        """True when a task of ``name`` may start now; else ``item`` waits here."""
        bucket = self._buckets.get(name)
        if bucket is None:
            return True
        waiting = self._waiting.get(name)
        if not waiting and bucket.can_consume(1):
            return True
        self._waiting.setdefault(name, deque()).append(item)
        return False

    def release(self, limit: int) -> list[Any]:
        """Up to ``limit`` items whose tokens are available now (each takes its token),
        in arrival order per task type."""
        ready: list[Any] = []
        for name, waiting in self._waiting.items():
            bucket = self._buckets.get(name)
            while waiting and len(ready) < limit and (bucket is None or bucket.can_consume(1)):
                ready.append(waiting.popleft())
        return ready

    def next_release(self) -> float | None:
        """Seconds until the next waiting task gets a token; None when none waits."""
        delays = [
            bucket.expected_time(1) if (bucket := self._buckets.get(name)) else 0.0
            for name, waiting in self._waiting.items()
            if waiting
        ]
        return max(0.0, min(delays)) if delays else None

    def remove(self, predicate: Any) -> list[Any]:
        """Take out (and return) waiting items for which ``predicate(item)`` holds."""
        removed = []
        for name, waiting in self._waiting.items():
            keep = deque()
            for item in waiting:
                (removed if predicate(item) else keep).append(item)
            self._waiting[name] = keep
        return removed

    def __len__(self) -> int:
        return sum(len(waiting) for waiting in self._waiting.values())

    def drain(self) -> list[Any]:
        """Every waiting item (shutdown hands them back to the broker)."""
        items = [item for waiting in self._waiting.values() for item in waiting]
        self._waiting.clear()
        return items
