"""Routing: which queue a task message goes to.

Precedence, as in Celery: options given to ``apply_async``, then the task's own
``queue``/``routing_key`` attributes, then a plugin's ``kernel_route_task`` hook,
then ``task_routes``, then the default queue.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from kernel.exceptions import ConfigurationError

ROUTING_KEYS = ("queue", "exchange", "routing_key", "priority", "exchange_type")


def _match_mapping(routes: Mapping, name: str) -> dict | None:
    if name in routes:
        return _as_options(routes[name])
    for pattern, route in routes.items():
        if isinstance(pattern, re.Pattern):
            if pattern.match(name):
                return _as_options(route)
        elif (
            isinstance(pattern, str)
            and any(c in pattern for c in "*?[")
            and fnmatch.fnmatchcase(name, pattern)
        ):
            return _as_options(route)
    return None


def _as_options(route: Any) -> dict:
    if isinstance(route, str):
        return {"queue": route}
    if isinstance(route, Mapping):
        return dict(route)
    raise ConfigurationError(
        f"task_routes entry {route!r} must be a queue name or a dict like {{'queue': 'q'}}"
    )


def route_from_setting(
    routes: Any, name: str, args: Any, kwargs: Any, options: dict
) -> dict | None:
    """Apply ``task_routes`` (mapping, function, or list of those) to one task."""
    if not routes:
        return None
    for router in routes if isinstance(routes, (list, tuple)) else [routes]:
        if isinstance(router, Mapping):
            found = _match_mapping(router, name)
        elif isinstance(router, str):
            from kernel.plugins.specs import resolve

            target = router if ":" in router else ":".join(router.rsplit(".", 1))
            found = _call_router(resolve(target), name, args, kwargs, options)
        elif callable(router):
            found = _call_router(router, name, args, kwargs, options)
        else:
            raise ConfigurationError(
                f"task_routes item {router!r} is neither a dict nor a function"
            )
        if found:
            return _as_options(found)
    return None


def _call_router(
    router: Callable[..., Any], name: str, args: Any, kwargs: Any, options: dict
) -> Any:
    """Call a router; Celery's take ``(name, args, kwargs, options, task=None, **kw)``."""
    try:
        accepts_task = "task" in inspect.signature(router).parameters
    except (TypeError, ValueError):
        accepts_task = False
    if accepts_task:
        return router(name, args, kwargs, options, task=None)
    return router(name, args, kwargs, options)


def resolve_route(
    app: Any, name: str, args: Any, kwargs: Any, options: dict, task_routing: Mapping | None = None
) -> dict:
    """Return ``{"queue", "exchange", "routing_key", "priority"}`` for one message."""
    route: dict[str, Any] = {}
    explicit = {k: options[k] for k in ROUTING_KEYS if options.get(k) is not None}
    if not explicit.get("queue"):
        chosen = dict(task_routing or {})
        if not chosen.get("queue"):
            chosen = (
                app.plugins.hook.kernel_route_task(
                    app=app, name=name, args=args, kwargs=kwargs, options=options
                )
                or route_from_setting(app.conf.task_routes, name, args, kwargs, options)
                or {}
            )
            chosen = _as_options(chosen) if chosen else {}
        route.update(chosen)
    route.update(explicit)
    conf = app.conf
    queue = route.get("queue") or conf.task_default_queue
    route["queue"] = queue
    if route.get("exchange") == "":
        # The default exchange, named explicitly (a retry of a message that came
        # through it, a Celery-style route): straight to the queue its key names.
        route["exchange_type"] = "direct"
        if not route.get("routing_key"):
            route["routing_key"] = queue
    configured = app.configured_queue(queue)
    if configured is not None:  # a Queue object of task_queues: its binding
        route.setdefault("exchange", configured.exchange.name)
        route.setdefault("routing_key", configured.routing_key)
        route.setdefault("exchange_type", configured.exchange.type)
    is_default = queue == conf.task_default_queue
    route.setdefault("exchange", (conf.task_default_exchange if is_default else None) or queue)
    route.setdefault(
        "routing_key", (conf.task_default_routing_key if is_default else None) or queue
    )
    if route.get("exchange") is None:
        route["exchange"] = queue
    if route.get("routing_key") in (None, ""):
        route["routing_key"] = queue
    if route.get("priority") is None:
        route["priority"] = conf.task_default_priority
    return route
