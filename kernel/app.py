"""The App: configuration, the task registry, publishing, and access to results.

An App is an explicit object (no hidden global app); workers, results and the CLI
are all handed one. Capabilities (transport, backend, serializers) come from the
plugin manager, found by URL scheme or name.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import Any

from kombu import Connection, Exchange, Queue

from kernel import protocol
from kernel.config import Settings, check_publish_retry_policy
from kernel.control import Control
from kernel.exceptions import (
    ConfigurationError,
    NotRegistered,
    PublishError,
    broker_connection_errors,
)
from kernel.exceptions import describe_broker_error as _describe
from kernel.plugins.manager import PluginManager, default_manager, redact_url
from kernel.result import AsyncResult
from kernel.routing import resolve_route
from kernel.serialization import Serialization
from kernel.task import Task, current_request, task_name_for

log = logging.getLogger(__name__)

_TASK_OPTIONS = {
    "name",
    "bind",
    "base",
    "ignore_result",
    "track_started",
    "serializer",
    "compression",
    "queue",
    "routing_key",
    "exchange",
    "priority",
    "acks_late",
    "reject_on_worker_lost",
    "time_limit",
    "soft_time_limit",
    "expires",
    "max_retries",
    "default_retry_delay",
    "autoretry_for",
    "dont_autoretry_for",
    "retry_kwargs",
    "retry_backoff",
    "retry_backoff_max",
    "retry_jitter",
    "typing",
    "rate_limit",
}


#: Routing and protocol options ``send_task`` takes besides its named parameters.
_SEND_OPTIONS = frozenset(
    {
        "queue",
        "routing_key",
        "exchange",
        "priority",
        "exchange_type",
        "reply_to",
        "group_id",
        "group_index",
        "root_id",
        "parent_id",
        "shadow",
        "chord",
        "chain",
    }
)


class DisabledBackend:
    """Stands in when ``result_backend`` is None: storing is a no-op, reading explains."""

    def __init__(self, app: App, url: str | None = None) -> None:
        self.app = app

    def store_result(self, *args: Any, **kwargs: Any) -> dict:
        return {}

    mark_as_started = mark_as_done = mark_as_failure = mark_as_revoked = store_result

    supports_chords = False

    def ensure_chords_supported(self, what: str = "chord") -> None:
        raise ConfigurationError(
            f"a {what} needs a result backend to count its header's results, and results "
            "are disabled (result_backend is None); configure one that supports chords, "
            "e.g. App(backend='sqlite:///kernel.sqlite3'), Redis or SQL"
        )

    def on_chord_part_return(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigurationError(
            "results are disabled (result_backend is None); configure one, e.g. "
            "App(backend='sqlite:///kernel.sqlite3'), to read task states and results"
        )

    get_task_meta = wait_for = forget = _refuse
    save_group = restore_group = delete_group = apply_chord = get_task_metas = _refuse

    def cleanup(self) -> int:
        return 0

    def close(self) -> None:
        """Nothing to release."""


def _declaration_cached(connection: Any, entity: Any) -> bool:
    """Whether kombu's per-connection cache says ``entity`` is declared already.

    The same test kombu's ``maybe_declare`` makes, read without binding a copy of the
    entity to the channel first (kombu's order), which cost about 15 % of a publish.
    The cache is cleared whenever the connection is, so a new connection declares again.
    """
    return bool(entity.can_cache_declaration) and hash(entity) in connection.declared_entities


class App:
    """A kernel application: ``app = kernel.App("proj", broker=..., backend=...)``."""

    def __init__(
        self,
        main: str | None = None,
        *,
        broker: str | None = None,
        backend: str | None | Any = ...,
        include: Iterable[str] | None = None,
        config_source: Any = None,
        plugins: PluginManager | None = None,
        **settings: Any,
    ) -> None:
        self.main = main
        self.conf = Settings()
        self.conf.from_environ()
        if config_source is not None:
            self.conf.config_from_object(config_source)
        if broker is not None:
            self.conf.broker_url = broker
        if backend is not ...:
            self.conf.result_backend = backend
        if settings:
            self.conf.update(settings)
        if include:
            self.conf.imports = list(self.conf.imports) + list(include)
        self.tasks: dict[str, Task] = {}
        self._plugins = plugins
        self._finalized = False
        self._ready = False
        self._finalize_lock = threading.RLock()
        self._backend: Any = None
        self._serialization: Serialization | None = None
        self._local = threading.local()
        self._route_entities: dict[tuple, tuple[Exchange, Queue]] = {}

    # ----------------------------------------------------------------- set-up

    @property
    def plugins(self) -> PluginManager:
        if self._plugins is None:
            self._plugins = default_manager()
        return self._plugins

    @property
    def serialization(self) -> Serialization:
        if self._serialization is None:
            self._serialization = Serialization(self.plugins)
        return self._serialization

    @cached_property
    def control(self) -> Control:
        """Remote control of running workers: ``app.control.revoke(task_id)``."""
        return Control(self)

    def finalize(self) -> App:
        """Register serializers, run ``kernel_configure`` hooks, import task modules."""
        if self._ready:  # every publish calls this: no lock once finalized
            return self
        with self._finalize_lock:
            if self._finalized:  # done, or being done by this thread (a hook re-entered)
                return self
            self._finalized = True
            _ = self.serialization
            self.plugins.hook.kernel_configure(app=self)
            self.import_task_modules()
            self._ready = True
        return self

    def import_task_modules(self) -> None:
        for module in self.conf.imports:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigurationError(
                    f"cannot import task module {module!r} listed in include/imports: {exc}"
                ) from exc

    def config_from_object(self, obj: Any) -> None:
        self.conf.config_from_object(obj)

    # ----------------------------------------------------------------- tasks

    def task(self, *args: Any, **options: Any) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., bind=True)``."""
        unknown = set(options) - _TASK_OPTIONS
        if unknown:
            raise TypeError(
                f"unknown task option(s) {sorted(unknown)}; valid: {sorted(_TASK_OPTIONS)}"
            )

        def decorate(function: Callable[..., Any]) -> Task:
            return self._register(function, options)

        if len(args) == 1 and callable(args[0]) and not options:
            return decorate(args[0])
        if args:
            raise TypeError("use @app.task or @app.task(option=value), not positional options")
        return decorate

    def _register(self, function: Callable[..., Any], options: dict) -> Task:
        base = options.pop("base", None) or Task
        name = options.pop("name", None) or task_name_for(self, function)
        attributes = {
            "name": name,
            "app": self,
            "run": staticmethod(function),
            "__doc__": function.__doc__,
            "__module__": function.__module__,
            "__wrapped__": function,
            **options,
        }
        cls = type(function.__name__, (base,), attributes)
        task = cls()
        self.tasks[name] = task
        return task

    def get_task(self, name: str) -> Task:
        try:
            return self.tasks[name]
        except KeyError:
            raise NotRegistered(
                f"task {name!r} is not registered with this app; check the worker was "
                "started with the app that defines it (-A) or add its module to include=[...]"
            ) from None

    # ----------------------------------------------------------------- connections

    def connection(self, url: str | None = None) -> Connection:
        """A new (lazy) kombu connection to the broker, through the transport plugin."""
        self.finalize()
        url = url or self.conf.broker_url
        spec = self.plugins.transport_for_url(url)
        transport = spec.load()
        connection = Connection(
            url,
            transport=transport,
            transport_options=self._transport_options(spec),
            connect_timeout=self.conf.broker_connection_timeout,
            ssl=self.conf.broker_use_ssl or False,
        )
        # kombu takes the part before "+" of a URL like redis+socket:// as the name of
        # its own transport; keep the plugin's.
        connection.transport_cls = transport
        return connection

    def _transport_options(self, spec: Any) -> dict[str, Any]:
        """The options a transport is built with: its defaults, then the kernel
        settings it asks for (``TransportSpec.setting_options``), then the user's
        ``broker_transport_options``."""
        options = dict(spec.default_options)
        for option, setting_name in spec.setting_options.items():
            try:
                options[option] = getattr(self.conf, setting_name)
            except AttributeError:
                raise ConfigurationError(
                    f"transport plugin {spec.name!r} asks for setting {setting_name!r} "
                    f"(as its option {option!r}), which the kernel does not have; the "
                    "plugin needs an update for this kernel version"
                ) from None
        options.update(self.conf.broker_transport_options or {})
        return options

    def broker_features(self) -> frozenset[str]:
        return self.plugins.transport_for_url(self.conf.broker_url).features

    def _producer(self) -> Any:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.connection = self.connection()
            local.producer = local.connection.Producer()
            local.errors = broker_connection_errors(local.connection)
            local.pid = os.getpid()
        return local.producer

    def close(self) -> None:
        """Close this thread's publishing connection and the result backend."""
        connection = getattr(self._local, "connection", None)
        if connection is not None and self._local.pid == os.getpid():
            connection.release()
        self._local = threading.local()
        if self._backend is not None:
            self._backend.close()

    # ----------------------------------------------------------------- results

    @property
    def backend(self) -> Any:
        if self._backend is None:
            self.finalize()
            url = self.conf.result_backend
            if not url:
                self._backend = DisabledBackend(self)
            else:
                spec = self.plugins.backend_for_url(url)
                self._backend = spec.load()(self, url)
        return self._backend

    def signature(
        self,
        name: Any,
        args: Any = None,
        kwargs: Any = None,
        options: dict | None = None,
        **extra_options: Any,
    ) -> Any:
        """A signature of task ``name`` (its code need not be importable here); options
        as an ``options`` dict and/or keywords, as Celery takes them."""
        from kernel.canvas import signature

        return signature(name, args, kwargs, options, app=self, **extra_options)

    def GroupResult(self, group_id: str, results: Any = None) -> Any:  # noqa: N802
        from kernel.result import GroupResult

        return GroupResult(group_id, results, app=self)

    def AsyncResult(self, task_id: str, task_name: str | None = None) -> AsyncResult:  # noqa: N802
        return AsyncResult(task_id, self, task_name=task_name)

    # ----------------------------------------------------------------- sending

    def _as_datetime(self, value: Any, what: str) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, (int, float)):
            return datetime.now(timezone.utc) + timedelta(seconds=value)
        if isinstance(value, datetime):
            if value.tzinfo is None:
                from zoneinfo import ZoneInfo

                value = value.replace(tzinfo=ZoneInfo(self.conf.timezone))
            return value.astimezone(timezone.utc)
        raise TypeError(f"{what} must be seconds or a datetime, got {value!r}")

    def send_task(
        self,
        name: str,
        args: Any = None,
        kwargs: Any = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: Any = None,
        task_id: str | None = None,
        headers: dict | None = None,
        link: Any = None,
        link_error: Any = None,
        serializer: str | None = None,
        compression: str | None = None,
        ignore_result: bool | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        retries: int = 0,
        retry: bool | None = None,
        retry_policy: dict | None = None,
        task_routing: dict | None = None,
        declare: bool = True,
        **options: Any,
    ) -> AsyncResult:
        """Send a task by name (its code need not be importable here).

        ``retry`` and ``retry_policy`` say whether and how sending retries when the
        broker connection fails (defaults: ``task_publish_retry`` and
        ``task_publish_retry_policy``, whose keys ``retry_policy`` overrides); when
        it gives up, :class:`~kernel.exceptions.PublishError` is raised.
        ``declare=False`` publishes to the route's exchange and routing key without
        declaring a queue (retries use it to go back where the message came from).
        """
        self.finalize()
        unknown = set(options) - _SEND_OPTIONS
        if unknown:
            raise TypeError(f"send_task() got unknown option(s) {sorted(unknown)}")
        if args is not None and not isinstance(args, (list, tuple)):
            raise TypeError(f"args must be a list or tuple, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}")
        publish_retry = self.conf.task_publish_retry if retry is None else bool(retry)
        policy = dict(self.conf.task_publish_retry_policy)
        if retry_policy is not None:
            policy.update(check_publish_retry_policy(retry_policy, "retry_policy"))
        task_id = task_id or str(uuid.uuid4())
        if countdown is not None:
            if eta is not None:
                raise TypeError("give countdown or eta, not both")
            eta_at = self._as_datetime(float(countdown), "countdown")
        else:
            eta_at = self._as_datetime(eta, "eta")
        expires_at = self._as_datetime(expires, "expires")
        parent = current_request()
        parent_id = options.pop("parent_id", None)
        root_id = options.pop("root_id", None)
        if parent is not None and parent.id and parent.id != task_id:  # not a retry of itself
            parent_id = parent_id or parent.id
            root_id = root_id or parent.root_id or parent.id
            parent.children.append([[task_id, None], None])
        if ignore_result is None:
            ignore_result = self.conf.task_ignore_result
        # Unset limits stay unset in the message: the worker then applies the task's
        # options and its own task_time_limit/task_soft_time_limit, as Celery does.
        extra_headers = dict(headers or {})
        if eta_at is not None and "delayed_delivery" in self.broker_features():
            extra_headers[protocol.DELIVER_AT_HEADER] = eta_at.timestamp()
        message = protocol.build_task_message(
            name=name,
            task_id=task_id,
            args=args,
            kwargs=kwargs,
            eta=eta_at,
            expires=expires_at,
            retries=retries,
            group_id=options.pop("group_id", None),
            group_index=options.pop("group_index", None),
            root_id=root_id,
            parent_id=parent_id,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            callbacks=_signatures(link),
            errbacks=_signatures(link_error),
            chain=options.pop("chain", None),
            chord=options.pop("chord", None),
            reply_to=options.pop("reply_to", None),
            ignore_result=bool(ignore_result),
            shadow=options.pop("shadow", None),
            extra_headers=extra_headers,
        )
        route = resolve_route(self, name, args, kwargs, options, task_routing)
        self._publish(
            name,
            message,
            route,
            serializer or self.conf.task_serializer,
            compression or self.conf.task_compression,
            declare,
            publish_retry,
            policy,
        )
        return AsyncResult(task_id, self, task_name=name)

    def _entities(self, route: dict) -> tuple[Exchange, Queue]:
        """The kombu exchange and queue of a route, built once per distinct route."""
        key = (
            route["queue"],
            route["exchange"],
            route["routing_key"],
            route.get("exchange_type") or "direct",
        )
        entities = self._route_entities.get(key)
        if entities is None:
            configured = self.configured_queue(key[0])
            if (
                configured is not None
                and (
                    configured.exchange.name,
                    configured.routing_key,
                    configured.exchange.type,
                )
                == key[1:]
            ):
                entities = (configured.exchange, configured)
            else:
                exchange = Exchange(key[1], type=key[3])
                queue = Queue(
                    key[0], exchange, routing_key=key[2], queue_arguments=self._queue_arguments()
                )
                entities = (exchange, queue)
            self._route_entities[key] = entities
        return entities

    def configured_queue(self, name: str) -> Queue | None:
        """The kombu ``Queue`` named ``name`` in ``task_queues``, if one is given there."""
        for queue in self.conf.task_queues or ():
            if isinstance(queue, Queue) and queue.name == name:
                return queue
        return None

    def _queue_arguments(self) -> dict[str, Any] | None:
        """Arguments of the queues kernel declares by name, from the settings."""
        arguments: dict[str, Any] = {}
        if self.conf.task_default_queue_type != "classic":
            arguments["x-queue-type"] = self.conf.task_default_queue_type
        if self.conf.task_queue_max_priority is not None:
            arguments["x-max-priority"] = int(self.conf.task_queue_max_priority)
        return arguments or None

    def _publish(
        self,
        name: str,
        message: protocol.TaskMessage,
        route: dict,
        serializer: str,
        compression: str | None,
        declare: bool = True,
        retry: bool = True,
        retry_policy: dict | None = None,
    ) -> None:
        self.serialization.serializer_spec(serializer)  # clear error for unknown names
        exchange, queue = self._entities(route)
        self.plugins.hook.kernel_before_task_publish(
            app=self,
            name=name,
            body=message.body,
            headers=message.headers,
            properties=message.properties,
            routing=route,
        )

        def send(producer: Any) -> None:
            declared = not declare or _declaration_cached(self._local.connection, queue)
            producer.publish(
                message.body,
                exchange=exchange,
                routing_key=route["routing_key"],
                serializer=serializer,
                compression=compression,
                headers=message.headers,
                priority=route.get("priority"),
                declare=[] if declared else [queue],
                **message.properties,
            )

        self._send_with_retry(
            send,
            f"task {name}[{message.id}]",
            message.id,
            retry,
            retry_policy or dict(self.conf.task_publish_retry_policy),
        )
        self.plugins.hook.kernel_after_task_publish(
            app=self, name=name, task_id=message.id, routing=route
        )

    def _send_with_retry(
        self,
        send: Callable[[Any], None],
        what: str,
        task_id: str | None,
        retry: bool,
        policy: dict,
    ) -> None:
        """Call ``send(producer)`` until it gets through, retrying connection failures
        as ``policy`` says (kombu's meaning of its keys); raise PublishError when done.

        Each attempt makes one connection attempt, so the number of attempts is exact
        and no wait is hidden; after a failure the connection is dropped and the next
        attempt starts afresh.
        """
        max_retries = policy.get("max_retries")
        attempts = 0
        while True:
            attempts += 1
            producer = self._producer()
            connection, errors = self._local.connection, self._local.errors
            try:
                connection.ensure_connection(max_retries=0)
                send(producer)
                return
            except errors as exc:
                self._drop_producer()
                if not retry or (max_retries is not None and attempts > max_retries):
                    raise self._publish_error(what, task_id, attempts, retry, exc) from exc
                delay = publish_retry_delay(policy, attempts)
                log.warning(
                    "could not send %s to broker %s (%s); retry %d of %s in %.2fs",
                    what,
                    redact_url(self.conf.broker_url),
                    _describe(exc),
                    attempts,
                    "unlimited" if max_retries is None else max_retries,
                    delay,
                )
                time.sleep(delay)

    def _publish_error(
        self, what: str, task_id: str | None, attempts: int, retry: bool, exc: BaseException
    ) -> PublishError:
        if retry:
            advice = (
                "raise task_publish_retry_policy['max_retries'] (or pass retry_policy=) "
                "to keep trying longer"
            )
        else:
            advice = "publish with retry=True (task_publish_retry) to ride out short outages"
        return PublishError(
            f"could not send {what} to broker {redact_url(self.conf.broker_url)}: "
            f"{_describe(exc)} (gave up after {attempts} attempt(s)"
            f"{'' if retry else ', retries disabled'}); the task was not queued. Check that "
            f"the broker is running and reachable, or {advice}",
            task_id=task_id,
            attempts=attempts,
        )

    def _drop_producer(self) -> None:
        """Forget this thread's publishing connection after it failed, without talking
        to a broker that is gone; the next publish connects afresh."""
        local = self._local
        connection = getattr(local, "connection", None)
        local.pid = None
        local.connection = local.producer = None
        if connection is not None:
            try:
                connection.collect()
            except Exception:
                log.debug("discarding a failed publishing connection", exc_info=True)

    def queues_for(self, names: Iterable[str]) -> list[Queue]:
        """kombu queues bound like the ones tasks are published to."""
        default = self.conf.task_default_queue
        queues = []
        for name in names:
            configured = self.configured_queue(name)
            if configured is not None:
                queues.append(configured)
                continue
            is_default = name == default
            exchange_name = (self.conf.task_default_exchange if is_default else None) or name
            routing_key = (self.conf.task_default_routing_key if is_default else None) or name
            queues.append(
                Queue(
                    name,
                    Exchange(exchange_name, type="direct"),
                    routing_key=routing_key,
                    queue_arguments=self._queue_arguments(),
                )
            )
        return queues

    def queue_names(self) -> list[str]:
        """The names of ``task_queues`` (names or ``Queue`` objects), else the default."""
        configured = self.conf.task_queues or [self.conf.task_default_queue]
        return [queue.name if isinstance(queue, Queue) else str(queue) for queue in configured]

    def purge(self, queues: Iterable[str] | None = None) -> int:
        """Delete every waiting message in ``queues`` (default queue); returns how many."""
        names = list(queues or [self.conf.task_default_queue])
        total = 0
        with self.connection() as connection:
            channel = connection.default_channel
            for queue in self.queues_for(names):
                queue.bind(channel).declare()
                total += queue.bind(channel).purge() or 0
        return total

    def __repr__(self) -> str:
        return f"<App {self.main or '__main__'}: {len(self.tasks)} tasks>"


def publish_retry_delay(policy: dict, retry: int) -> float:
    """Seconds to wait before retry number ``retry`` (1, 2, ...) of a publish: kombu's
    ``interval_start``, plus ``interval_step`` per earlier retry, at most ``interval_max``."""
    start = float(policy.get("interval_start", 0))
    step = float(policy.get("interval_step", 0))
    longest = float(policy.get("interval_max", start + step * (retry - 1)))
    return max(0.0, min(start + step * (retry - 1), longest))


def _signatures(value: Any) -> list | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    return [dict(item) for item in items]
