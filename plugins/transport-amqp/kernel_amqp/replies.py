"""Where the result of a task received in this process must be sent (rpc://).

The rpc:// backend sends a result to the ``reply_to`` queue of the task's message. The
kernel passes the task's request (which has it) when it stores a result from inside
the task. It stores some states without one: REVOKED for a message dropped on arrival,
FAILURE for a worker that died. So the transport notes the reply address of every task
message this process consumes, and the backend looks it up by task id.

The book is process-wide. It holds the latest :data:`CAPACITY` entries, which is far
more messages than a worker holds at once.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

#: Entries kept; the oldest are forgotten first.
CAPACITY = 20_000

_lock = threading.Lock()
_book: OrderedDict[str, tuple[str, str | None]] = OrderedDict()


def remember(task_id: str, reply_to: str, correlation_id: str | None) -> None:
    with _lock:
        _book[task_id] = (reply_to, correlation_id)
        _book.move_to_end(task_id)
        while len(_book) > CAPACITY:
            _book.popitem(last=False)


def lookup(task_id: str) -> tuple[str, str | None] | None:
    """``(reply_to, correlation_id)`` of a task message consumed here, or None."""
    with _lock:
        return _book.get(task_id)


def clear() -> None:
    """Forget everything."""
    with _lock:
        _book.clear()


def _after_fork_in_child() -> None:
    """A forked child starts with an empty book: the parent's messages are not its
    own. The lock is made anew, not taken: another thread of the parent may have held
    it at the fork, and nobody in the child would ever release it."""
    global _lock
    _lock = threading.Lock()
    _book.clear()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
