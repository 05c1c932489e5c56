"""Delivery counts that survive both kinds of RabbitMQ queue.

The kernel worker bounds redelivery of a message by its ``x-delivery-count`` header
(``task_max_deliveries``). On this broker, requeueing works by publishing a copy with
the count raised, and then:

- a classic queue keeps the header as published, and never counts on its own;
- a quorum queue *replaces* the header with its own count of returns of this copy
  (0 on the first delivery), so the publisher's count would be lost.

So the transport moves the published count to a header of its own when publishing
(:data:`KERNEL_COUNT_HEADER`), and on receipt ``x-delivery-count`` is that count
only: the attempts the kernel knows of.

The broker's own count is *not* used. RabbitMQ 3.10 raises it whenever a channel
closes with the message unacknowledged, including messages a worker prefetched or
held for their ETA and never started, so a few warm restarts would dead-letter tasks
that never ran. What bounds a task that kills its worker (SIGKILL, OOM) on quorum
queues is the broker's delivery limit instead (a ``delivery-limit`` policy, or the
``delivery_limit`` option, well above ``task_max_deliveries``): such a message is
counted by that limit only, and dead-lettered by the broker when it is reached.
"""

from __future__ import annotations

from typing import Any

from kernel.protocol import DELIVERY_COUNT_HEADER

#: Where the transport keeps the count given at publishing.
KERNEL_COUNT_HEADER = "x-kernel-delivery-count"


def _as_count(value: Any) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError):
        return 0
    return max(count, 0)


def on_publish(headers: dict[str, Any] | None) -> dict[str, Any] | None:
    """Move the count a publisher set to :data:`KERNEL_COUNT_HEADER` (in place)."""
    if not headers:
        return headers
    if DELIVERY_COUNT_HEADER in headers:
        count = _as_count(headers.pop(DELIVERY_COUNT_HEADER))
        if count:
            headers[KERNEL_COUNT_HEADER] = count
        else:
            headers.pop(KERNEL_COUNT_HEADER, None)
    return headers


def on_receive(headers: dict[str, Any] | None) -> dict[str, Any] | None:
    """Set ``x-delivery-count`` to the published count, dropping the broker's (in
    place; see the module)."""
    if headers is None:
        return None
    published = headers.pop(KERNEL_COUNT_HEADER, None)
    if published is None:
        headers.pop(DELIVERY_COUNT_HEADER, None)
        return headers
    headers[DELIVERY_COUNT_HEADER] = _as_count(published)
    return headers
