"""Routing: which queue, exchange and routing key a task message gets."""

from __future__ import annotations

import re
import time
import uuid

import pytest
from kombu import Queue

from kernel import hookimpl
from kernel.app import App
from kernel.exceptions import ConfigurationError
from kernel.plugins.manager import PluginManager
from kernel.routing import resolve_route


def route_by_module(name, args, kwargs, options, task=None):
    """A Celery-style router function referenced by name in ``task_routes``."""
    if name.startswith("proj.reports."):
        return {"queue": "reports"}
    return None


class QueueRouter:
    """A plugin routing tasks whose name ends in ``.urgent``."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    @hookimpl
    def kernel_route_task(self, app, name, args, kwargs, options):
        self.calls.append({"name": name, "args": args, "kwargs": kwargs})
        if name.endswith(".urgent"):
            return {"queue": "from-plugin", "priority": 9}
        return None


@pytest.fixture
def app(kernel_plugins):
    return App("routing", broker="memory://", backend=None, plugins=kernel_plugins)


@pytest.fixture
def plugin_app():
    """An app whose plugin manager has the QueueRouter plugin registered."""
    plugins = PluginManager().load(environ={"KERNEL_PLUGIN_AUTOLOAD": "0"})
    router = QueueRouter()
    assert plugins.register(router, "test-router")
    app = App("routing", broker="memory://", backend=None, plugins=plugins)
    app.router = router
    return app


def route(app, name="proj.tasks.add", options=None, task_routing=None, args=(), kwargs=None):
    return resolve_route(app, name, args, kwargs or {}, dict(options or {}), task_routing)


# ----------------------------------------------------------------------- defaults


def test_unrouted_task_goes_to_the_default_queue(app):
    assert route(app) == {
        "queue": "celery",
        "exchange": "celery",
        "routing_key": "celery",
        "priority": None,
    }


def test_default_exchange_routing_key_and_priority_settings_apply(app):
    app.conf.update(
        task_default_queue="work",
        task_default_exchange="tasks",
        task_default_routing_key="task.work",
        task_default_priority=5,
    )
    assert route(app) == {
        "queue": "work",
        "exchange": "tasks",
        "routing_key": "task.work",
        "priority": 5,
    }


def test_other_queue_gets_exchange_and_routing_key_named_after_it(app):
    app.conf.update(task_default_exchange="tasks", task_default_routing_key="task.work")
    found = route(app, options={"queue": "video"})
    assert (found["queue"], found["exchange"], found["routing_key"]) == ("video", "video", "video")


# ----------------------------------------------------------------------- explicit and task


def test_explicit_queue_option_wins(app):
    app.conf.task_routes = {"proj.tasks.add": "from-setting"}
    found = route(app, options={"queue": "explicit"}, task_routing={"queue": "from-task"})
    assert found["queue"] == "explicit"


def test_explicit_routing_options_are_kept(app):
    found = route(app, options={"queue": "q", "exchange": "ex", "routing_key": "rk", "priority": 3})
    assert found == {"queue": "q", "exchange": "ex", "routing_key": "rk", "priority": 3}


def test_task_queue_attribute_routes_the_task(app):
    app.conf.task_routes = {"proj.tasks.add": "from-setting"}
    assert route(app, task_routing={"queue": "from-task"})["queue"] == "from-task"


def test_apply_async_publishes_to_the_task_queue_attribute(kernel_app):
    queue_name = f"video.{uuid.uuid4().hex[:8]}"

    @kernel_app.task(queue=queue_name)
    def encode(path):
        return path

    result = encode.delay("movie.mp4")

    message = _get_message(kernel_app, queue_name)
    assert message is not None, f"nothing arrived in queue {queue_name}"
    assert message.headers["id"] == result.id


def test_send_task_publishes_to_the_explicit_queue(kernel_app):
    queue_name = f"explicit.{uuid.uuid4().hex[:8]}"
    result = kernel_app.send_task("proj.anything", (1,), queue=queue_name)

    message = _get_message(kernel_app, queue_name)
    assert message is not None
    assert message.headers["id"] == result.id


def test_a_queue_is_declared_once_per_publishing_connection(kernel_app, monkeypatch):
    declared = []
    real = Queue.declare

    def counting(self, *args, **kwargs):
        declared.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Queue, "declare", counting)
    queue_name = f"once.{uuid.uuid4().hex[:8]}"
    for n in range(3):
        kernel_app.send_task("proj.anything", (n,), queue=queue_name)
    assert declared == [queue_name]
    kernel_app.close()  # a new connection: the broker may have lost it, declare again
    kernel_app.send_task("proj.anything", (3,), queue=queue_name)
    assert declared == [queue_name, queue_name]
    for _ in range(4):
        assert _get_message(kernel_app, queue_name) is not None


def _get_message(app, queue_name, timeout=2.0):
    with app.connection() as connection:
        bound = Queue(queue_name, routing_key=queue_name)(connection.default_channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = bound.get(no_ack=True)
            if message is not None:
                return message
            time.sleep(0.01)
    return None


# ----------------------------------------------------------------------- task_routes


def test_task_routes_dict_by_exact_name(app):
    app.conf.task_routes = {"proj.tasks.add": {"queue": "math", "routing_key": "math.add"}}
    found = route(app)
    assert (found["queue"], found["routing_key"], found["exchange"]) == ("math", "math.add", "math")


def test_task_routes_dict_value_may_be_a_queue_name(app):
    app.conf.task_routes = {"proj.tasks.add": "math"}
    assert route(app)["queue"] == "math"


def test_task_routes_glob_pattern(app):
    app.conf.task_routes = {"proj.video.*": "video"}
    assert route(app, "proj.video.encode")["queue"] == "video"
    assert route(app, "proj.audio.encode")["queue"] == "celery"


def test_task_routes_exact_name_beats_glob(app):
    app.conf.task_routes = {"proj.video.*": "video", "proj.video.thumbnail": "images"}
    assert route(app, "proj.video.thumbnail")["queue"] == "images"


def test_task_routes_compiled_regex(app):
    app.conf.task_routes = {re.compile(r"^proj\.(video|audio)\."): "media"}
    assert route(app, "proj.audio.mix")["queue"] == "media"
    assert route(app, "proj.text.spell")["queue"] == "celery"


def test_task_routes_function_receives_name_args_and_kwargs(app):
    seen = []

    def router(name, args, kwargs, options):
        seen.append((name, args, kwargs))
        return {"queue": "by-size"} if kwargs.get("size", 0) > 10 else None

    app.conf.task_routes = router
    assert route(app, kwargs={"size": 100})["queue"] == "by-size"
    assert route(app, kwargs={"size": 1})["queue"] == "celery"
    assert seen[0] == ("proj.tasks.add", (), {"size": 100})


def test_task_routes_celery_router_taking_a_task_argument(app):
    def router(name, args, kwargs, options, task):
        return {"queue": "celery-style"} if task is None else None

    app.conf.task_routes = router
    assert route(app)["queue"] == "celery-style"


def test_task_routes_list_is_tried_in_order(app):
    app.conf.task_routes = [
        lambda name, args, kwargs, options: None,
        {"proj.tasks.*": "first"},
        {"proj.tasks.add": "second"},
    ]
    assert route(app)["queue"] == "first"
    assert route(app, "proj.other.x")["queue"] == "celery"


def test_task_routes_router_named_by_module_and_attribute(app):
    app.conf.task_routes = [f"{__name__}:route_by_module"]
    assert route(app, "proj.reports.daily")["queue"] == "reports"


def test_task_routes_router_named_by_celery_dotted_path(app):
    app.conf.task_routes = [f"{__name__}.route_by_module"]
    assert route(app, "proj.reports.daily")["queue"] == "reports"


def test_task_routes_entry_of_wrong_type_raises_configuration_error(app):
    app.conf.task_routes = {"proj.tasks.add": 42}
    with pytest.raises(ConfigurationError, match="42"):
        route(app)


def test_task_routes_item_of_wrong_type_raises_configuration_error(app):
    app.conf.task_routes = [42]
    with pytest.raises(ConfigurationError, match="neither a dict nor a function"):
        route(app)


# ----------------------------------------------------------------------- kernel_route_task


def test_route_task_hook_routes_the_task(plugin_app):
    found = route(plugin_app, "proj.alerts.urgent", args=(1,))
    assert found["queue"] == "from-plugin"
    assert found["priority"] == 9
    assert plugin_app.router.calls == [{"name": "proj.alerts.urgent", "args": (1,), "kwargs": {}}]


def test_route_task_hook_beats_task_routes(plugin_app):
    plugin_app.conf.task_routes = {"proj.alerts.*": "from-setting"}
    assert route(plugin_app, "proj.alerts.urgent")["queue"] == "from-plugin"


def test_route_task_hook_returning_none_defers_to_task_routes(plugin_app):
    plugin_app.conf.task_routes = {"proj.alerts.*": "from-setting"}
    assert route(plugin_app, "proj.alerts.minor")["queue"] == "from-setting"


def test_task_attribute_beats_route_task_hook(plugin_app):
    found = route(plugin_app, "proj.alerts.urgent", task_routing={"queue": "from-task"})
    assert found["queue"] == "from-task"
    assert plugin_app.router.calls == []


def test_explicit_queue_beats_route_task_hook(plugin_app):
    assert (
        route(plugin_app, "proj.alerts.urgent", options={"queue": "explicit"})["queue"]
        == "explicit"
    )


def test_route_task_hook_is_used_when_publishing(plugin_app):
    @plugin_app.task(name="proj.alerts.urgent")
    def alert():
        return "!"

    alert.delay()
    message = _get_message(plugin_app, "from-plugin")
    assert message is not None
    assert message.headers["task"] == "proj.alerts.urgent"


def test_router_is_called_exactly_once_even_when_it_raises_type_error(kernel_app):
    calls = []

    def router(name, args, kwargs, options):
        calls.append(name)
        raise TypeError("router bug")

    kernel_app.conf.task_routes = [router]
    with pytest.raises(TypeError, match="router bug"):
        kernel_app.send_task("proj.anything", ())
    assert calls == ["proj.anything"]


def test_queue_objects_in_task_queues_give_their_binding_and_arguments(kernel_plugins):
    from kombu import Exchange

    reports = Queue(
        "reports",
        Exchange("office", type="topic"),
        routing_key="reports.#",
        queue_arguments={"x-max-priority": 10},
    )
    app = App("q", broker="memory://", backend=None, plugins=kernel_plugins)
    app.conf.update(task_queues=[reports, "plain"], task_routes={"r.*": {"queue": "reports"}})
    route = resolve_route(app, "r.monthly", (), {}, {})
    assert (route["exchange"], route["routing_key"], route["exchange_type"]) == (
        "office",
        "reports.#",
        "topic",
    )
    assert app._entities(route)[1] is reports  # declared with its arguments
    assert app.queue_names() == ["reports", "plain"]
    consumed = app.queues_for(app.queue_names())
    assert consumed[0] is reports
    assert consumed[1].queue_arguments is None


def test_default_queue_type_and_max_priority_reach_the_queues_declared_by_name(kernel_plugins):
    app = App("q", broker="memory://", backend=None, plugins=kernel_plugins)
    app.conf.update(task_default_queue_type="quorum", task_queue_max_priority=5)
    [queue] = app.queues_for(["work"])
    assert queue.queue_arguments == {"x-queue-type": "quorum", "x-max-priority": 5}
    _, published = app._entities(resolve_route(app, "t.any", (), {}, {"queue": "work"}))
    assert published.queue_arguments == {"x-queue-type": "quorum", "x-max-priority": 5}


def test_unknown_queue_type_is_refused():
    with pytest.raises(ValueError, match="task_default_queue_type"):
        App("q", broker="memory://", backend=None, task_default_queue_type="stream")


def test_an_explicit_default_exchange_goes_straight_to_the_queue():
    """A retry of a message that came through the default exchange (a requeued copy, a
    Celery client's direct send) must not go to an exchange named after its queue."""
    from kombu import Exchange, Queue

    from kernel import App
    from kernel.routing import resolve_route

    app = App(
        "default-exchange",
        broker="memory://",
        task_queues=[Queue("video", Exchange("media", "topic"), routing_key="media.video.#")],
    )
    route = resolve_route(
        app, "t", (), {}, {"exchange": "", "routing_key": "video", "queue": "video"}
    )
    assert (route["exchange"], route["routing_key"], route["exchange_type"]) == (
        "",
        "video",
        "direct",
    )
    route = resolve_route(app, "t", (), {}, {"exchange": "", "queue": "video"})
    assert (route["exchange"], route["routing_key"]) == ("", "video")
    # without an explicit exchange the configured binding still applies
    route = resolve_route(app, "t", (), {}, {"queue": "video"})
    assert (route["exchange"], route["routing_key"], route["exchange_type"]) == (
        "media",
        "media.video.#",
        "topic",
    )
