"""Settings: one attrs class, Celery's names where the meaning matches.

Each field's ``doc`` metadata is the configuration reference (``docs/configuration.md``
is generated from it by ``python -m kernel.config``). Values come, later winning, from
the defaults, ``KERNEL_<NAME>`` environment variables, ``App(...)`` arguments,
``app.conf.update()`` and ``app.conf.config_from_object()``.
"""

from __future__ import annotations
import __future__

import difflib
import importlib
import json
import logging
import os
import warnings
from datetime import timedelta
from typing import Any

import attrs

from kernel.exceptions import ConfigurationError

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "kernel.sqlite3"


def seconds(value: Any, name: str) -> float | None:
    """Accept seconds or a ``timedelta`` (Celery configurations use both)."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise ConfigurationError(f"{name} must be seconds or a timedelta, got {value!r}")


#: Celery's default ``task_publish_retry_policy``.
DEFAULT_PUBLISH_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}


def check_publish_retry_policy(value: Any, name: str) -> dict[str, Any]:
    """A copy of a publish retry policy (``retry_policy=``), its keys and values checked."""
    if not isinstance(value, dict):
        raise ConfigurationError(
            f"{name} must be a dict like {DEFAULT_PUBLISH_RETRY_POLICY!r}, got {value!r}"
        )
    unknown = sorted(set(value) - set(DEFAULT_PUBLISH_RETRY_POLICY))
    if unknown:
        raise ConfigurationError(
            f"{name} has unknown key(s) {unknown}; valid: {sorted(DEFAULT_PUBLISH_RETRY_POLICY)}"
        )
    for key, number in value.items():
        if key == "max_retries" and number is None:
            continue
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
            raise ConfigurationError(
                f"{name}[{key!r}] must be a number of at least 0"
                f"{' or None (retry for ever)' if key == 'max_retries' else ''}, got {number!r}"
            )
    return dict(value)


def publish_retry_policy(value: Any, name: str) -> dict[str, Any]:
    """The full policy: ``value``'s keys over the defaults (None means the defaults)."""
    if value is None:
        return dict(DEFAULT_PUBLISH_RETRY_POLICY)
    return {**DEFAULT_PUBLISH_RETRY_POLICY, **check_publish_retry_policy(value, name)}


def setting(default: Any, doc: str, *, factory: Any = None) -> Any:
    if factory is not None:
        return attrs.field(factory=factory, metadata={"doc": doc})
    return attrs.field(default=default, metadata={"doc": doc})


@attrs.define(slots=False)
class Settings:
    """Every setting an app understands. Change them with ``app.conf.update(...)``."""

    # ----------------------------------------------------------- broker and results
    broker_url: str = setting(
        f"sqlite:///{DEFAULT_DATABASE}",
        "Where task messages go. The embedded default is a SQLite file in the current "
        "directory; `sqlite:////abs/path.db` for an absolute path, `memory://` for one "
        "process. Other schemes come from plugins (`redis://`, `amqp://`).",
    )
    broker_transport_options: dict = setting(
        None,
        "Options passed to the transport, e.g. `{'visibility_timeout': 30}` for the "
        "SQLite transport's lease length in seconds.",
        factory=dict,
    )
    broker_use_ssl: dict | bool | None = setting(
        None,
        "TLS for the broker connection: True, or a dict of options for the transport "
        "(Redis: `{'ssl_cert_reqs': 'required', 'ssl_ca_certs': '/path/ca.pem'}`; AMQP: "
        "`ssl.SSLContext.wrap_socket` options such as `{'cert_reqs': ssl.CERT_REQUIRED}`). "
        "None: TLS only as the URL says (`rediss://`, `amqps://`).",
    )
    broker_connection_timeout: float = setting(
        4.0, "Seconds to wait when connecting to the broker."
    )
    broker_connection_retry: bool = setting(
        True,
        "When a running worker loses its broker connection, reconnect (waiting 0.5s, "
        "then twice as long each time, up to 5s, between attempts) and go on consuming. "
        "Running tasks keep running meanwhile; acknowledgements that fail are sent again "
        "once the connection is back. False stops the worker with an error instead "
        "(unfinished messages return to the queue).",
    )
    broker_connection_retry_on_startup: bool = setting(
        True,
        "Keep trying when the broker cannot be reached as a worker starts (one warning "
        "per attempt); False makes the worker exit with an error at the first failure.",
    )
    broker_connection_max_retries: int | None = setting(
        100,
        "How many reconnection attempts in a row a worker makes, at start-up or after "
        "losing the connection, before it gives up and stops with an error. 0 or None "
        "retries for ever (as in Celery).",
    )
    result_backend: str | None = setting(
        f"sqlite:///{DEFAULT_DATABASE}",
        "Where results are stored; the same SQLite file as the broker by default. "
        "`cache+memory://` keeps results in this process only; None disables results.",
    )
    result_backend_transport_options: dict = setting(
        None,
        "Options for the result backend's client, e.g. `{'global_keyprefix': 'app1:', "
        "'retry_timeout': 10}` or Sentinel's `{'master_name': 'mymaster'}` for the Redis "
        "backend (see its documentation for the full list).",
        factory=dict,
    )
    redis_backend_use_ssl: dict | None = setting(
        None,
        "TLS options of the Redis result backend (`ssl_cert_reqs`, `ssl_ca_certs`, "
        "`ssl_certfile`, `ssl_keyfile`), as Celery names them; the URL's query and "
        "`result_backend_transport_options` take precedence.",
    )
    result_expires: float | None = attrs.field(
        default=86400.0,
        converter=lambda value: seconds(value, "result_expires"),
        metadata={
            "doc": "Seconds (or a timedelta) after which stored results may be "
            "deleted (default one day); None keeps them."
        },
    )
    result_serializer: str = setting("json", "Serializer for stored results.")
    result_accept_content: list | None = setting(
        None, "Content types accepted when reading results; None means `accept_content`."
    )
    result_extended: bool = setting(
        False,
        "Store the task's name, args, kwargs, worker hostname, retries and queue with its "
        "result (Celery's extended result), where they can be read back with "
        "`backend.get_task_meta(id)`. The SQL backend keeps them in columns of its own.",
    )
    database_table_names: dict = setting(
        None,
        "SQL result backend: table names, `{'task': ..., 'group': ...}`; left out, "
        "Celery's `celery_taskmeta` and `celery_tasksetmeta`.",
        factory=dict,
    )
    database_table_schemas: dict = setting(
        None,
        "SQL result backend: the schema of each table, `{'task': ..., 'group': ...}` "
        "(PostgreSQL schema, MySQL database); left out, the connection's default. The "
        "schema must exist. The kernel's chord tables go in the task table's schema.",
        factory=dict,
    )
    database_engine_options: dict = setting(
        None,
        "SQL result backend: keyword arguments for SQLAlchemy's `create_engine` "
        "(`pool_size`, `max_overflow`, `pool_pre_ping`, `pool_recycle`, `echo`, "
        "`connect_args`, ...), applied over the defaults `pool_recycle=3600, "
        "pool_pre_ping=False` (an operation on a dead pooled connection is retried on a "
        "new one anyway, so pinging first would only add a round trip).",
        factory=dict,
    )
    database_short_lived_sessions: bool = setting(
        False,
        "SQL result backend: open a new database connection for every operation and "
        "close it afterwards, instead of keeping a pool (for servers that drop idle "
        "connections, or behind PgBouncer-like proxies).",
    )
    database_retry_timeout: float = setting(
        10.0,
        "SQL result backend: seconds an operation is retried while the database is "
        "unreachable or reports a transient error (deadlock, lock timeout, lost "
        "connection) before it fails with `SQLBackendUnavailable`.",
    )

    # ----------------------------------------------------------- messages
    task_serializer: str = setting("json", "Serializer for task messages.")
    accept_content: list = setting(
        None,
        "Content types (or serializer names) a worker accepts. JSON only by default; "
        "add 'pickle' only if every producer is trusted.",
        factory=lambda: ["json"],
    )
    task_compression: str | None = setting(None, "Compression for task messages (e.g. 'zlib').")
    task_publish_retry: bool = setting(
        True,
        "Retry sending a task message when the broker connection fails, following "
        "`task_publish_retry_policy`; `retry=` of `apply_async`/`send_task` overrides it. "
        "When sending gives up (at once with False) it raises `PublishError`, naming the "
        "broker and the cause: a task is never dropped silently.",
    )
    task_publish_retry_policy: dict = attrs.field(
        factory=lambda: dict(DEFAULT_PUBLISH_RETRY_POLICY),
        converter=lambda value: publish_retry_policy(value, "task_publish_retry_policy"),
        metadata={
            "doc": "How sending a task retries: `max_retries` (retries after the first "
            "attempt; None retries for ever), `interval_start` (seconds before the first "
            "retry), `interval_step` (added for each further retry), `interval_max` "
            "(longest wait). Keys left out keep these defaults; `retry_policy=` of "
            "`apply_async`/`send_task` overrides keys for one call."
        },
    )

    # ----------------------------------------------------------- routing
    task_default_queue: str = setting("celery", "Queue for tasks without a route (Celery's name).")
    task_default_exchange: str | None = setting(
        None, "Exchange for tasks without a route; None means the queue's name."
    )
    task_default_routing_key: str | None = setting(
        None, "Routing key for tasks without a route; None means the queue's name."
    )
    task_default_priority: int | None = setting(None, "Priority for tasks that set none.")
    task_queues: list | None = setting(
        None,
        "Queues the worker consumes from when `-Q` is not given: names, or kombu `Queue` "
        "objects, whose exchange, routing key and arguments (e.g. `x-max-priority`, "
        "`x-queue-type`) are then used wherever kernel declares or routes to that queue.",
    )
    task_default_queue_type: str = attrs.field(
        default="classic",
        validator=attrs.validators.in_(("classic", "quorum")),
        metadata={
            "doc": "Type of the queues kernel declares by name (not `Queue` objects of "
            "`task_queues`): `classic`, or `quorum` for RabbitMQ's replicated queues "
            "(`x-queue-type`). Brokers without queue types ignore it."
        },
    )
    task_queue_max_priority: int | None = setting(
        None,
        "`x-max-priority` of the queues kernel declares by name (RabbitMQ classic queues "
        "need it for priorities); None declares none.",
    )
    task_routes: Any = setting(
        None,
        "Routes: a dict mapping a task name or glob (`'proj.tasks.*'`) or compiled regex "
        "to options like `{'queue': 'video'}`, a router function `(name, args, kwargs, "
        "options) -> dict | None`, or a list of these, tried in order.",
    )

    # ----------------------------------------------------------- execution
    task_always_eager: bool = setting(
        False, "Run tasks in the calling process instead of sending them (for tests)."
    )
    task_eager_propagates: bool = setting(
        False,
        "In eager mode, `apply()`/`delay()` raise the task's exception at once (as in "
        "Celery, off by default; `.get()` raises it either way).",
    )
    task_acks_late: bool = setting(
        True,
        "Acknowledge a message after its task finished (at-least-once). Unlike Celery, "
        "this is the default; set False (or `acks_late=False` on a task) to ack before running.",
    )
    task_reject_on_worker_lost: bool = setting(
        True,
        "When the process running a task dies, return the message to the queue (bounded by "
        "`task_max_deliveries`). False marks the task FAILURE at once.",
    )
    task_max_deliveries: int = setting(
        3,
        "How many times a message may be delivered to workers that die running it; after "
        "that it is dead-lettered and its task marked FAILURE with WorkerLostError.",
    )
    task_dead_letter_queue: str = setting(
        "kernel.dead_letter", "Queue receiving messages that exceeded `task_max_deliveries`."
    )
    task_track_started: bool = setting(
        False, "Record the STARTED state when a worker begins a task."
    )
    task_ignore_result: bool = setting(False, "Store no results unless a task asks for them.")
    task_store_errors_even_if_ignored: bool = setting(
        False, "Store failures of tasks that ignore their results."
    )
    task_time_limit: float | None = setting(
        None,
        "Hard time limit in seconds: the process running a task past it is killed and "
        "replaced, and the task fails with `TimeLimitExceeded`. A worker setting "
        "(`--time-limit`): it applies to messages whose `timelimit` header and task give "
        "none. Enforced by the prefork pool; checked about once a second.",
    )
    task_soft_time_limit: float | None = setting(
        None,
        "Soft time limit in seconds: `SoftTimeLimitExceeded` is raised inside the task, "
        "which may catch it to clean up. Applied like `task_time_limit` "
        "(`--soft-time-limit`); enforced by the prefork, solo and threads pools.",
    )
    task_default_rate_limit: str | float | None = setting(
        None,
        "Rate limit for task types that set none: `'10/s'`, `'100/m'`, `'1000/h'` or a "
        "number per second. Each worker enforces it on its own, with bursts of up to one "
        "second's worth of tasks.",
    )
    timezone: str = setting("UTC", "Time zone for naive datetimes given as `eta`.")

    # ----------------------------------------------------------- worker
    worker_concurrency: int | None = setting(
        None,
        "Number of pool processes or threads; None means the pool's default (prefork: CPU "
        "count, threads: 4 x CPU count, solo: 1).",
    )
    worker_pool: str = setting("prefork", "Pool: solo, threads, prefork, or a plugin's.")
    worker_prefetch_multiplier: int = setting(
        4, "Messages reserved per pool slot (0 means unlimited)."
    )
    worker_disable_rate_limits: bool = setting(
        False, "Ignore every rate limit (task options and `task_default_rate_limit`)."
    )
    worker_max_tasks_per_child: int | None = setting(
        None, "Replace a prefork child after it ran this many tasks (`--max-tasks-per-child`)."
    )
    worker_max_memory_per_child: int | None = setting(
        None,
        "Replace a prefork child, after its current task, once its resident memory "
        "exceeds this many KiB (`--max-memory-per-child`).",
    )
    worker_autoscale: str | None = setting(
        None,
        "`'MAX,MIN'`: grow the pool up to MAX slots while tasks wait and shrink it back "
        "towards MIN when idle (`--autoscale`; prefork and threads pools).",
    )
    worker_autoscale_keepalive: float = setting(
        30.0, "Seconds a slot added by autoscale must stay unneeded before it is removed."
    )
    worker_soft_shutdown_timeout: float = setting(
        0.0,
        "Soft shutdown: when a cold shutdown is asked for (SIGQUIT, or a second "
        "SIGTERM/SIGINT), first let running tasks go on for this many seconds, then "
        "stop them and return their messages to the queue. 0 disables it.",
    )
    worker_shutdown_timeout: float = setting(
        60.0,
        "Seconds a warm shutdown waits for running tasks before it turns cold; their "
        "messages are then returned to the queue, never lost.",
    )
    imports: list = setting(
        None,
        "Modules the worker imports to register tasks (`include=` adds to it).",
        factory=list,
    )
    worker_state_db: str | None = setting(
        None,
        "File where the worker keeps the ids of revoked tasks, so a restarted worker "
        "still refuses them (`kernel worker --statedb PATH`); None keeps them in memory.",
    )
    worker_revoked_max: int = setting(
        50000, "How many revoked task ids a worker remembers; the oldest are dropped first."
    )
    worker_revoked_expires: float | None = attrs.field(
        default=10800.0,
        converter=lambda value: seconds(value, "worker_revoked_expires"),
        metadata={
            "doc": "Seconds (or a timedelta) a worker remembers a revoked task id (default "
            "three hours); a task revoked longer ago runs if its message arrives."
        },
    )

    # ----------------------------------------------------------- remote control
    control_exchange: str = setting(
        "celery",
        "Name of the remote-control mailbox (exchange `<name>.pidbox`); Celery's name by "
        "default, so kernel and Celery clients and workers reach each other.",
    )

    # ------------------------------------------------------------------ behaviour

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in attrs.fields(cls)]

    def update(self, mapping: Any = None, /, **options: Any) -> None:
        """Set several settings; unknown names warn with the closest valid one."""
        values = dict(mapping or {}, **options)
        known = set(self.names())
        for key, value in values.items():
            name = key.lower()
            if name not in known:
                warn_unknown(key)
                continue
            setattr(self, name, value)

    def config_from_object(self, obj: Any) -> None:
        """Read settings from a module, a dotted module path, or an object.

        Only lowercase public attributes are read; uppercase ones are treated as
        Celery's old ``CELERY_*`` style and rejected with a hint.
        """
        if isinstance(obj, str):
            try:
                obj = importlib.import_module(obj)
            except ImportError as exc:
                raise ConfigurationError(
                    f"cannot import configuration module {obj!r}: {exc}; "
                    "give a module importable from the current directory"
                ) from exc
        from_mapping = isinstance(obj, dict)
        if from_mapping:
            source = dict(obj)
        else:
            source = {name: getattr(obj, name) for name in dir(obj) if not name.startswith("_")}
        known = set(self.names())
        values = {}
        for name, value in source.items():
            if name.isupper():
                log.warning(
                    "setting %s ignored: kernel uses lowercase names (try %r)",
                    name,
                    name.lower().removeprefix("celery_"),
                )
            elif (
                from_mapping
                or name in known
                or not (callable(value) or isinstance(value, (type(os), __future__._Feature)))
            ):  # a module's functions, classes, modules and __future__ imports are not settings
                values[name] = value
        self.update(values)

    def from_environ(self, environ: dict[str, str] | None = None) -> None:
        """Read ``KERNEL_<SETTING>`` variables (JSON values, else plain strings)."""
        env = environ if environ is not None else os.environ
        for field in attrs.fields(type(self)):
            raw = env.get(f"KERNEL_{field.name.upper()}")
            if raw is None:
                continue
            setattr(self, field.name, _parse_env_value(raw, field))

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)


def _parse_env_value(raw: str, field: Any) -> Any:
    """JSON for non-string settings; ``none``/``null`` unsets settings that allow None."""
    if raw.strip().lower() in ("none", "null") and "None" in str(field.type):
        return None
    if isinstance(field.default, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def warn_unknown(name: str) -> None:
    close = difflib.get_close_matches(name.lower(), Settings.names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see docs/configuration.md"
    warnings.warn(f"unknown setting {name!r} ignored{hint}", UserWarning, stacklevel=3)


def reference_markdown() -> str:
    """The configuration reference, generated from the field docs."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `kernel/config.py` by `make docs`. Set values with",
        "`app.conf.update(name=value)`, `app.conf.config_from_object('module')`, or",
        "environment variables `KERNEL_<NAME>` (JSON values are parsed: "
        "`KERNEL_WORKER_CONCURRENCY=4`).",
        "",
        "| Setting | Default | Meaning |",
        "| --- | --- | --- |",
    ]
    defaults = Settings()
    for field in attrs.fields(Settings):
        default = getattr(defaults, field.name)
        doc = field.metadata["doc"].replace("|", "\\|")
        lines.append(f"| `{field.name}` | `{default!r}` | {doc} |")
    return "\n".join(lines) + "\n"
