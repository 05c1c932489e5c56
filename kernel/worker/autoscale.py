"""Autoscale: grow the pool while work waits, shrink it back when it has been idle.

``--autoscale MAX,MIN``: the pool starts with MIN slots (processes or threads), grows
up to MAX as soon as reserved tasks wait for a slot, and gives back slots nobody
needed for ``worker_autoscale_keepalive`` seconds, never below MIN.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def parse_autoscale(value: Any) -> tuple[int, int] | None:
    """``"10,3"`` or ``(10, 3)`` -> (max, min); ``"10"`` means (10, 0); None stays None."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.split(",") if p.strip()]
        else:
            parts = [int(p) for p in value]
    except (TypeError, ValueError):
        parts = []
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"invalid autoscale {value!r}: give MAX,MIN, e.g. --autoscale 10,3")
    high, low = (parts + [0])[:2]
    if high < 1 or low < 0 or low > high:
        raise ValueError(
            f"invalid autoscale {value!r}: need MAX >= 1 and 0 <= MIN <= MAX, e.g. --autoscale 10,3"
        )
    return high, low


class Autoscaler:
    """Decides the pool size from the worker's load; called from the worker's loop."""

    #: Seconds between decisions.
    interval = 0.5

    def __init__(self, worker: Any, high: int, low: int, keepalive: float) -> None:
        self.worker = worker
        self.high, self.low = high, max(low, 1)
        self.keepalive = keepalive
        self._next = 0.0
        self._busy_at = time.monotonic()

    def maybe_scale(self, waiting: int, running: int) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        pool = self.worker.pool
        wanted = min(self.high, max(self.low, waiting + running))
        if wanted > pool.limit:
            added = pool.grow(wanted - pool.limit)
            if added:
                log.info("autoscale: %d more slot(s), now %d", added, pool.limit)
                self.worker.pool_resized()
            self._busy_at = now
        elif wanted >= pool.limit or waiting:
            self._busy_at = now
        elif now - self._busy_at >= self.keepalive and pool.limit > self.low:
            idle = pool.limit - max(running, self.low)
            removed = pool.shrink(idle) if idle > 0 else 0
            if removed:
                log.info("autoscale: %d idle slot(s) removed, now %d", removed, pool.limit)
                self.worker.pool_resized()
            self._busy_at = now

    def info(self) -> dict:
        return {"max": self.high, "min": self.low, "keepalive": self.keepalive}
