"""Pauses between polls of a store that cannot notify (SQLite, SQL result tables).

Work comes in bursts: right after a message was delivered or a task was sent, the next
message or the result usually follows within milliseconds, while an idle queue may
stay empty for hours. A fixed pause makes every round trip pay half of it on average;
a pause that starts short after activity and doubles while nothing comes answers a
burst within about a millisecond and costs an idle poller no more than the fixed one.
"""

from __future__ import annotations

#: The first pause after activity, in seconds.
FIRST_PAUSE = 0.001


class Backoff:
    """Pauses that start at ``first`` and double on each empty poll up to ``ceiling``.

    ``reset()`` when something arrived (or was just asked for); ``next()`` after a poll
    that found nothing returns how long to sleep before the next one.
    """

    def __init__(self, ceiling: float, first: float = FIRST_PAUSE) -> None:
        self.ceiling = max(0.0, ceiling)
        self.first = min(first, self.ceiling)
        self._pause = self.first

    def reset(self) -> None:
        self._pause = self.first

    def next(self) -> float:
        pause = self._pause
        self._pause = min(pause * 2 or self.first, self.ceiling)
        return pause
