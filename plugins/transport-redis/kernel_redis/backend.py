"""The Redis result backend: Celery's keys and layout, pub/sub waits, Celery's chords.

Results are ``celery-task-meta-<id>`` strings holding Celery's JSON document, saved
groups ``celery-taskset-meta-<id>``, both expiring after ``result_expires``; every
store is also published on the channel named after its key, which is what wakes a
waiting ``get()`` (kernel's and Celery's) without polling.

Chords follow Celery's Redis protocol, so Celery and kernel processes sharing one
Redis run each other's chords. For the chord ``<gid>``, next to the taskset key
``K = celery-taskset-meta-<gid>``:

- ``K.s``: the header's size, written by the client before the last header message;
- ``K.j``: a sorted set of the finished parts ``[1, task_id, state, value]`` scored by
  their ``group_index`` (a list when ``result_chord_ordered`` is false);
- ``K.d``: the set of ``<task_id>:<group_index>`` already counted, so a redelivered
  header task is counted once;
- ``K.t``: parts added while the chord runs (``add_to_chord``);
- ``K.c``: the claim of the worker sending the body (a token expiring after
  ``chord_claim_timeout``), then ``done``.

A part and the check "is the chord complete, and may I send its body" are one Lua
script, so however many workers finish together, one claims the body. If that worker
dies before sending it, its claim expires; the header task it was running comes back
(acks late) and its second report claims and sends the body: never lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import traceback as traceback_module
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from kernel import states
from kernel.backends import document
from kernel.backends.base import KeyValueBackend
from kernel.exceptions import (
    ChordError,
    ConfigurationError,
    KernelError,
    TaskRevokedError,
    TimeoutError,
)
from kernel.result import AsyncResult, GroupResult, ResultSet
from kernel_redis import urls

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Keys read per MGET.
MGET_BATCH = 1000

#: redis-py connection options used unless the URL or the transport options say otherwise.
CONNECTION_DEFAULTS: dict[str, Any] = {
    "socket_timeout": 30.0,
    "socket_connect_timeout": 4.0,
    "socket_keepalive": True,
    "health_check_interval": 25,
    "retry_on_timeout": True,
}

#: ``result_backend_transport_options`` keys read by the backend itself (besides the
#: connection options of :data:`kernel_redis.urls.CONNECTION_OPTIONS`).
BACKEND_OPTIONS = frozenset(
    {"global_keyprefix", "master_name", "sentinel_kwargs", "retry_timeout", "result_chord_ordered"}
)

# Records one finished header task and tells whether the chord is complete; if it is,
# claims the body for this caller (token, expiring) unless someone holds the claim.
# KEYS: parts, extra, size, counted, taskset, claim
# ARGV: task id, encoded part, ordered ('1'/'0'), group index (or '+inf'),
#       expiry of the chord keys (ms, 0: none), of the taskset (ms), of the claim (ms),
#       claim token
# Returns {finished parts, extra parts, size, claimed}; finished is -1 after "done".
PART_SCRIPT = """
if redis.call('GET', KEYS[6]) == 'done' then
    return {-1, false, false, 0}
end
if redis.call('SADD', KEYS[4], ARGV[1] .. ':' .. ARGV[4]) == 1 then
    if ARGV[3] == '1' then
        redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
    else
        redis.call('RPUSH', KEYS[1], ARGV[2])
    end
end
local finished
if ARGV[3] == '1' then
    finished = redis.call('ZCARD', KEYS[1])
else
    finished = redis.call('LLEN', KEYS[1])
end
local chord_ms, taskset_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
if chord_ms > 0 then
    for i = 1, 4 do
        redis.call('PEXPIRE', KEYS[i], chord_ms)
    end
    if taskset_ms > 0 then
        redis.call('PEXPIRE', KEYS[5], taskset_ms)
    end
end
local extra = redis.call('GET', KEYS[2])
local size = redis.call('GET', KEYS[3])
local claimed = 0
if size and finished == tonumber(size) + tonumber(extra or 0) then
    if redis.call('SET', KEYS[6], ARGV[8], 'NX', 'PX', ARGV[7]) then
        claimed = 1
    end
end
return {finished, extra, size, claimed}
"""

# Renews the claim of token ARGV[1] for ARGV[2] ms, or takes it again if it expired
# while the chord still exists. KEYS: claim, size. Returns 1 when the caller holds it.
EXTEND_CLAIM_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if not holder and redis.call('EXISTS', KEYS[2]) == 1 then
    if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
        return 1
    end
end
return 0
"""

# The chord's outcome is settled: drop its bookkeeping and mark it done (ARGV[2] ms,
# 0: no expiry), if token ARGV[1] still holds the claim. KEYS: claim, parts, extra,
# size, counted. Returns 1 when it did.
FINISH_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
if tonumber(ARGV[2]) > 0 then
    redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
else
    redis.call('SET', KEYS[1], 'done')
end
return 1
"""

# One more part for a running chord, counted once however often it is retried (a
# timed-out INCR may have been applied): KEYS: extra (``.t``), counted (``.d``);
# ARGV: the new part's id, chord expiry (ms, 0: none).
GROW_SCRIPT = """
if redis.call('SADD', KEYS[2], 'added:' .. ARGV[1]) == 1 then
    redis.call('INCR', KEYS[1])
end
if tonumber(ARGV[2]) > 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# add_to_set: KEYS: the set; ARGV: member, expiry (ms, 0: none). Returns the size.
ADD_TO_SET_SCRIPT = """
redis.call('SADD', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SCARD', KEYS[1])
"""


def _is_channel(message: dict, channel: str) -> bool:
    """Whether a pub/sub reply is about ``channel`` (redis-py gives bytes or str)."""
    name = message.get("channel")
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name == channel


class RedisBackendUnavailable(KernelError, ConnectionError):
    """Redis did not answer within the backend's ``retry_timeout``."""


def _milliseconds(seconds: float | None) -> int:
    """A Redis expiry in ms; 0 means none (None, 0 or negative seconds)."""
    return int(seconds * 1000) if seconds and seconds > 0 else 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _ChordKeys:
    """The Redis keys of one chord (see the module docstring)."""

    def __init__(self, taskset_key: str) -> None:
        self.taskset = taskset_key
        self.parts = f"{taskset_key}.j"
        self.extra = f"{taskset_key}.t"
        self.size = f"{taskset_key}.s"
        self.counted = f"{taskset_key}.d"
        self.claim = f"{taskset_key}.c"


class RedisBackend(KeyValueBackend):
    """Results in Redis (``redis://``, ``rediss://``, ``redis+socket://``, ``sentinel://``).

    Options come from the URL's query and from the setting
    ``result_backend_transport_options``: ``global_keyprefix`` (prepended to every
    key, as Celery does), ``master_name`` and ``sentinel_kwargs`` (sentinel),
    ``retry_timeout`` (seconds an operation retries while Redis is unreachable,
    default 10), ``result_chord_ordered`` (Celery's; default True), and the
    connection options of :data:`kernel_redis.urls.CONNECTION_OPTIONS`.
    """

    #: Seconds operations retry while Redis is unreachable, unless ``retry_timeout``.
    retry_timeout: float = 10.0
    #: Seconds between reads of the key while ``wait_for`` listens on its channel: a
    #: safety net for a writer that stores without publishing.
    recheck_interval: float = 1.0
    #: Seconds between polls when pub/sub is not available and no interval is given.
    fallback_interval: float = 0.2

    def __init__(self, app: Any, url: str) -> None:
        super().__init__(app, url)
        self.target = urls.parse(url)
        self.transport_options = {
            **(getattr(app.conf, "redis_backend_use_ssl", None) or {}),
            **(getattr(app.conf, "result_backend_transport_options", None) or {}),
        }
        options = self.transport_options
        unknown = sorted(set(options) - BACKEND_OPTIONS - set(urls.CONNECTION_OPTIONS))
        if unknown:
            log.warning(
                "result_backend_transport_options %s ignored by the Redis result backend "
                "(known: %s)",
                ", ".join(unknown),
                ", ".join(sorted(BACKEND_OPTIONS | set(urls.CONNECTION_OPTIONS))),
            )
        self.connection_options = {
            **CONNECTION_DEFAULTS,
            **urls.connection_options(self.target, options),
        }
        if self.target.scheme == "sentinel" and not options.get("master_name"):
            raise ConfigurationError(
                f"the sentinel URL {self._safe_url!r} needs the name of the master: set "
                "result_backend_transport_options={'master_name': 'mymaster'}"
            )
        self.key_prefix = self._prefix(options.get("global_keyprefix"))
        self.retry_timeout = float(options.get("retry_timeout", self.retry_timeout))
        self.chord_ordered = urls._to_bool(options.get("result_chord_ordered", True))
        self._client: Any = None
        self._client_pid: int | None = None
        self._scripts: dict[str, Any] = {}
        self._lock = threading.Lock()
        # Each thread's pub/sub connection, kept between waits (see _subscribe).
        self._listeners = threading.local()

    @staticmethod
    def _prefix(prefix: Any) -> str:
        """Celery's rule: a global prefix not ending in one of ``:_-.`` gets a ``_``."""
        if not prefix:
            return ""
        prefix = str(prefix)
        return prefix if prefix[-1] in ":_-." else f"{prefix}_"

    @property
    def _safe_url(self) -> str:
        from kernel.plugins.manager import redact_url

        return redact_url(self.url)

    # -- connections ---------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """This process's redis-py client; a forked child makes its own pool."""
        pid = os.getpid()
        if self._client is None or self._client_pid != pid:
            with self._lock:
                if self._client is None or self._client_pid != pid:
                    # A child inherits the parent's sockets: leave them to the parent.
                    self._client, self._client_pid = self._connect(), pid
                    self._scripts = {}
        return self._client

    def _connect(self) -> Any:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        options = dict(self.connection_options)
        options["retry"] = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
        target = self.target
        if target.scheme == "sentinel":
            from redis.sentinel import Sentinel, SentinelManagedSSLConnection

            if any(name.startswith("ssl_") for name in options):
                options["connection_class"] = SentinelManagedSSLConnection
            sentinel_kwargs = self.transport_options.get("sentinel_kwargs") or {
                name: options[name]
                for name in ("socket_timeout", "socket_connect_timeout")
                if name in options
            }
            sentinel = Sentinel(
                list(target.addresses), sentinel_kwargs=dict(sentinel_kwargs), **options
            )
            return sentinel.master_for(self.transport_options["master_name"], redis.Redis)
        if target.scheme == "redis+socket":
            options["connection_class"] = redis.UnixDomainSocketConnection
            options["path"] = target.socket_path
            options.pop("socket_keepalive", None)
            options.pop("socket_connect_timeout", None)
        else:
            options["host"], options["port"] = target.addresses[0]
            if target.tls:
                options["connection_class"] = redis.SSLConnection
        return redis.Redis(connection_pool=redis.ConnectionPool(**options))

    def _call(self, what: str, operation: Callable[[Any], T]) -> T:
        """Run ``operation(client)``, retrying for ``retry_timeout`` seconds while
        Redis is unreachable; then raise :class:`RedisBackendUnavailable`."""
        import redis

        deadline = None
        pause = 0.05
        while True:
            try:
                return operation(self.client)
            except redis.AuthenticationError as exc:
                raise ConfigurationError(
                    f"Redis refused the credentials of {self._safe_url!r}: {exc}; check the "
                    "password (redis://:password@host) or username"
                ) from exc
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_timeout
                    log.warning(
                        "Redis result backend %s unreachable (%s); retrying for %ss",
                        self._safe_url,
                        exc,
                        self.retry_timeout,
                    )
                if now >= deadline:
                    raise RedisBackendUnavailable(
                        f"could not {what}: the Redis result backend {self._safe_url!r} did "
                        f"not answer for {self.retry_timeout}s ({exc}); check that Redis is "
                        "running and reachable, or raise result_backend_transport_options"
                        "['retry_timeout']"
                    ) from exc
                time.sleep(min(pause, max(0.0, deadline - now)))
                pause = min(pause * 2, 1.0)

    def _script(self, source: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return script

    def _run_script(self, what: str, source: str, keys: list[str], args: list[Any]) -> Any:
        return self._call(what, lambda client: self._script(source)(keys, args, client=client))

    def close(self) -> None:
        self._forget_pubsub()
        client, self._client = self._client, None
        if client is not None and self._client_pid == os.getpid():
            client.connection_pool.disconnect()

    # -- key-value primitives ------------------------------------------------------------

    def _key(self, key: str) -> str:
        return f"{self.key_prefix}{key}"

    def get(self, key: str) -> bytes | None:
        return self._call("read a result", lambda client: client.get(self._key(key)))

    def set(self, key: str, value: bytes | str, expires: float | None) -> None:
        """Store ``value`` (expiring) and publish it on the channel named after the key,
        as Celery does: waiting clients wake up without polling."""
        full_key, expiry = self._key(key), _milliseconds(expires)

        def store(client: Any) -> None:
            with client.pipeline(transaction=False) as pipe:
                pipe.set(full_key, value, px=expiry or None)
                pipe.publish(full_key, value)
                pipe.execute()

        self._call("store a result", store)

    def delete(self, key: str) -> None:
        self._call("delete a result", lambda client: client.delete(self._key(key)))

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """One round trip of ``MGET`` batches (:data:`MGET_BATCH` keys each)."""
        if not keys:
            return []
        full_keys = [self._key(key) for key in keys]

        def read(client: Any) -> list[bytes | None]:
            with client.pipeline(transaction=False) as pipe:
                for start in range(0, len(full_keys), MGET_BATCH):
                    pipe.mget(full_keys[start : start + MGET_BATCH])
                return [value for batch in pipe.execute() for value in batch]

        return self._call("read results", read)

    def add_to_set(self, key: str, member: str, expires: float | None) -> int:
        return int(
            self._run_script(
                "count a chord part",
                ADD_TO_SET_SCRIPT,
                [self._key(key)],
                [member, _milliseconds(expires)],
            )
        )

    def set_if_absent(self, key: str, value: bytes | str, expires: float | None) -> bool:
        expiry = _milliseconds(expires) or None
        return bool(
            self._call(
                "claim a key", lambda client: client.set(self._key(key), value, nx=True, px=expiry)
            )
        )

    def delete_set(self, key: str) -> None:
        self.delete(key)

    def cleanup(self) -> int:
        """Nothing to do: Redis deletes expired keys itself."""
        return 0

    # -- waiting -------------------------------------------------------------------------

    def wait_for(
        self, task_id: str, timeout: float | None = None, interval: float | None = None
    ) -> dict:
        """Wait on the result's pub/sub channel; the key is read once subscribed, so a
        result stored before is not missed. ``interval`` only paces the polling used
        when pub/sub is unavailable."""
        import redis

        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self._key(document.result_key(task_id))
        try:
            pubsub = self._subscribe(channel, deadline)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
            log.warning(
                "cannot subscribe to %s on %s (%s); polling for task %s instead",
                channel,
                self._safe_url,
                exc,
                task_id,
            )
            return self._poll(task_id, deadline, timeout, interval)
        try:
            meta = self.get_task_meta(task_id)
            while meta["status"] not in states.READY_STATES:
                remaining = self.recheck_interval
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._timeout(task_id, meta, timeout)
                    remaining = min(remaining, left)
                try:
                    message = pubsub.get_message(timeout=remaining)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    self._forget_pubsub()
                    log.warning(
                        "lost the pub/sub connection to %s (%s); polling for task %s",
                        self._safe_url,
                        exc,
                        task_id,
                    )
                    return self._poll(task_id, deadline, timeout, interval)
                if message is None:
                    meta = self.get_task_meta(task_id)
                elif message.get("type") == "message" and _is_channel(message, channel):
                    meta = self._decode_published(task_id, message["data"])
            return meta
        finally:
            self._unsubscribe(pubsub, channel)

    def _subscribe(self, channel: str, deadline: float | None) -> Any:
        """This thread's pub/sub connection, subscribed to ``channel`` and confirmed by
        Redis (so a store after our next read is published to us).

        The connection is kept between waits: opening one (TCP, HELLO, CLIENT SETINFO)
        cost more than the rest of a round trip. Replies still queued on it for an
        earlier channel (its unsubscribe, a late result) are skipped."""
        pubsub = self._pubsub()
        try:
            pubsub.subscribe(channel)
            confirm_by = time.monotonic() + self.recheck_interval * 5
            if deadline is not None:
                confirm_by = min(confirm_by, deadline)
            while time.monotonic() < confirm_by:
                message = pubsub.get_message(timeout=max(0.0, confirm_by - time.monotonic()))
                if (
                    message is not None
                    and message.get("type") == "subscribe"
                    and _is_channel(message, channel)
                ):
                    break
        except BaseException:
            self._forget_pubsub()
            raise
        return pubsub

    def _pubsub(self) -> Any:
        listeners = self._listeners
        if getattr(listeners, "pubsub", None) is None or listeners.pid != os.getpid():
            listeners.pubsub, listeners.pid = self.client.pubsub(), os.getpid()
        return listeners.pubsub

    def _unsubscribe(self, pubsub: Any, channel: str) -> None:
        """Leave ``channel``, keeping the connection for the next wait; a connection
        that fails here is closed and the next wait opens another."""
        if pubsub is not getattr(self._listeners, "pubsub", None):
            return  # already closed after a failure
        try:
            pubsub.unsubscribe(channel)
        except Exception:
            self._forget_pubsub()

    def _forget_pubsub(self) -> None:
        """Close this thread's pub/sub connection (one a fork inherited is left alone)."""
        listeners = self._listeners
        pubsub = getattr(listeners, "pubsub", None)
        listeners.pubsub = None
        if pubsub is not None and listeners.pid == os.getpid():
            self._close_pubsub(pubsub)

    @staticmethod
    def _close_pubsub(pubsub: Any) -> None:
        try:
            pubsub.close()
        except Exception:  # the connection is dropped either way
            log.debug("closing a pub/sub connection failed", exc_info=True)

    def _decode_published(self, task_id: str, data: Any) -> dict:
        try:
            return self._decode(data)
        except Exception:  # not a result document: read the key instead
            log.warning("unreadable message on the channel of task %s; reading its key", task_id)
            return self.get_task_meta(task_id)

    def _poll(
        self, task_id: str, deadline: float | None, timeout: float | None, interval: float | None
    ) -> dict:
        pause = self.fallback_interval if interval is None else interval
        while True:
            meta = self.get_task_meta(task_id)
            if meta["status"] in states.READY_STATES:
                return meta
            if deadline is not None and time.monotonic() >= deadline:
                raise self._timeout(task_id, meta, timeout)
            time.sleep(pause)

    @staticmethod
    def _timeout(task_id: str, meta: dict, timeout: float | None) -> TimeoutError:
        return TimeoutError(
            f"task {task_id} still {meta['status']} after {timeout}s; "
            "raise the timeout, or check a worker consumes its queue"
        )

    # -- chords: Celery's Redis protocol --------------------------------------------------

    @property
    def chord_expires(self) -> float | None:
        """Celery's ``result_chord_expires``, else ``result_expires``."""
        value = getattr(self.app.conf, "result_chord_expires", None)
        return self.expires if value is None else value

    def _chord_keys(self, group_id: str) -> _ChordKeys:
        return _ChordKeys(self._key(document.group_key(group_id)))

    def apply_chord(self, group_id: str, header_ids: Sequence[str] | ResultSet, body: dict) -> None:
        """Write the header's size (``.s``), forget any earlier run of this group id,
        and save the header when it nests groups (its shape gives the body's values).

        Called before any header task is sent; Celery's client writes the size just
        before the last one, and its workers (like ours) fire the body only once the
        size is known.
        """
        self.ensure_chords_supported()
        if isinstance(header_ids, ResultSet):
            members = list(header_ids.results)
        else:
            members = [AsyncResult(task_id, self.app, backend=self) for task_id in header_ids]
        header = GroupResult(group_id, members, app=self.app)
        size = len(header._leaf_ids())
        keys = self._chord_keys(group_id)
        expiry = _milliseconds(self.chord_expires) or None
        saved = None
        if any(isinstance(member, ResultSet) for member in members):
            saved = self._encode({"result": header.as_tuple()})

        def prepare(client: Any) -> None:
            with client.pipeline(transaction=True) as pipe:
                pipe.delete(keys.claim, keys.parts, keys.counted, keys.extra)
                pipe.set(keys.size, size, px=expiry)
                if saved is not None:
                    pipe.set(keys.taskset, saved, px=expiry)
                pipe.execute()

        self._call("prepare a chord", prepare)

    def add_to_chord(self, group_id: str, result: Any = None) -> None:
        """One more part for a running chord (Celery's ``Task.add_to_chord``)."""
        keys = self._chord_keys(group_id)
        part_id = getattr(result, "id", None) or uuid.uuid4().hex  # the same on retries
        self._run_script(
            "grow a chord",
            GROW_SCRIPT,
            [keys.extra, keys.counted],
            [part_id, _milliseconds(self.chord_expires)],
        )

    def on_chord_part_return(self, request: Any, state: str, result: Any) -> None:
        """Count header task ``request.id`` in its chord; the report that completes the
        chord sends the body with the parts' values in ``group_index`` order.

        A report that finds the chord complete but claimed by another worker waits
        until that worker marks it done; if the claim expires first (the worker died
        before sending the body), this report claims the chord and sends the body.
        """
        group_id = getattr(request, "group", None)
        body = getattr(request, "chord", None)
        task_id = getattr(request, "id", None)
        if not group_id or not task_id or not body:
            return
        index = getattr(request, "group_index", None)
        score = "+inf" if index is None else str(int(index))
        part = self._encode([1, task_id, state, self._part_value(task_id, state, result)])
        keys = self._chord_keys(group_id)
        token = uuid.uuid4().hex
        claim_ms = _milliseconds(self.chord_claim_timeout)
        chord_ms = _milliseconds(self.chord_expires)
        taskset_ms = max(chord_ms, _milliseconds(self.expires)) if chord_ms and self.expires else 0
        script_keys = [keys.parts, keys.extra, keys.size, keys.counted, keys.taskset, keys.claim]
        script_args = [
            task_id,
            part,
            "1" if self.chord_ordered else "0",
            score,
            chord_ms,
            taskset_ms,
            claim_ms,
            token,
        ]

        def report() -> tuple[int, int | None, bool]:
            finished, extra, size, claimed = self._run_script(
                "count a chord part", PART_SCRIPT, script_keys, script_args
            )
            total = None if size is None else int(size) + int(extra or 0)
            return int(finished), total, bool(claimed)

        finished, total, claimed = report()
        if finished == -1:
            log.info(
                "chord %s: header task %s reported after the chord fired (a redelivered "
                "task); ignored",
                group_id,
                task_id,
            )
            return
        if total is None or finished < total:
            return  # not complete, or its size is not written yet (Celery: before the last)
        if not claimed and not self._await_claim(keys, token, report):
            return
        self._complete_chord(request, group_id, body, keys, token)

    def _part_value(self, task_id: str, state: str, result: Any) -> Any:
        """What a part stores: the value, or the exception as Celery encodes it."""
        if state not in states.EXCEPTION_STATES:
            return self.prepare_value(result)
        if not isinstance(result, BaseException):  # e.g. revoked without a reason given
            stored = document.result_value(self.get_task_meta(task_id))
            if isinstance(stored, BaseException):
                result = stored
            elif state == states.REVOKED:
                result = TaskRevokedError("revoked")
            else:
                result = RuntimeError(f"task ended in state {state} with {result!r}")
        return document.encode_exception(result)

    def _await_claim(self, keys: _ChordKeys, token: str, report: Callable[[], Any]) -> bool:
        """Wait while another report holds the claim of a complete chord; True when
        this one ends up holding it (the other's claim expired: it died)."""
        deadline = time.monotonic() + self.chord_claim_timeout * 3 + 5
        while time.monotonic() < deadline:
            holder = self._call("read a chord claim", lambda client: client.get(keys.claim))
            if holder is None:
                finished, total, claimed = report()
                if claimed:
                    return True
                if finished == -1 or total is None:
                    return False  # done, or failed and cleaned up meanwhile
                continue
            if _text(holder) == "done":
                return False
            if _text(holder) == token:  # our first report claimed it, its reply was lost
                return True
            time.sleep(0.05)
        log.warning("chord claim %s still held; not waiting for it any longer", keys.claim)
        return False

    def _complete_chord(
        self, request: Any, group_id: str, body: dict, keys: _ChordKeys, token: str
    ) -> None:
        values, failure = self._chord_outcome(group_id, keys)
        claim_ms = _milliseconds(self.chord_claim_timeout)
        done_ms = _milliseconds(self.chord_expires)
        try:
            if failure is not None:
                error, cause_traceback = failure
                log.error("chord %s: %s; failing its body", group_id, error)
                self._fail_chord(request, body, error, cause_traceback)
                return
            renewed = self._run_script(
                "renew a chord claim",
                EXTEND_CLAIM_SCRIPT,
                [keys.claim, keys.size],
                [token, claim_ms],
            )
            if not renewed:
                log.warning(
                    "chord %s: the claim to send its body expired and another worker took "
                    "it; not sending it from here",
                    group_id,
                )
                return
            from kernel.canvas import maybe_signature

            try:
                with self._claim_kept(keys, token, claim_ms):
                    maybe_signature(body, self.app).apply_async(
                        (values,), parent_id=request.id, root_id=request.root_id or request.id
                    )
            except Exception as exc:
                log.exception("chord %s: could not send its body", group_id)
                error = ChordError(f"Callback error: {exc!r}")
                error.__cause__ = exc
                self._fail_chord(request, body, error, traceback_module.format_exc())
        finally:
            finished = self._run_script(
                "finish a chord",
                FINISH_SCRIPT,
                [keys.claim, keys.parts, keys.extra, keys.size, keys.counted],
                [token, done_ms],
            )
            if not finished:
                log.warning(
                    "chord %s: its claim was lost before clean-up; its keys expire by themselves",
                    group_id,
                )

    @contextlib.contextmanager
    def _claim_kept(self, keys: _ChordKeys, token: str, claim_ms: int) -> Iterator[None]:
        """Renew the claim every third of its life while the body is being sent (a
        publish may retry for longer than the claim lasts), so that no other report
        takes the chord over and sends the body a second time."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.chord_claim_timeout / 3):
                try:
                    held = self._script(EXTEND_CLAIM_SCRIPT)(
                        [keys.claim, keys.size], [token, claim_ms], client=self.client
                    )
                except Exception as exc:  # Redis unreachable: the next turn tries again
                    log.warning("could not renew chord claim %s: %s", keys.claim, exc)
                    continue
                if not held:
                    log.warning("chord claim %s was lost while its body was sent", keys.claim)
                    return

        keeper = threading.Thread(target=renew, name=f"chord-claim-{token[:8]}", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join()

    def _chord_outcome(
        self, group_id: str, keys: _ChordKeys
    ) -> tuple[list[Any] | None, tuple[ChordError, str | None] | None]:
        """The body's values, or the ChordError (and cause traceback) to fail it with."""

        def read(client: Any) -> list[Any]:
            if self.chord_ordered:
                return client.zrange(keys.parts, 0, -1)
            return client.lrange(keys.parts, 0, -1)

        parts = [self._decode(raw) for raw in self._call("read a chord's parts", read)]
        outcomes = {str(part[1]): (part[2], part[3]) for part in parts}
        header = self.restore_group(group_id)  # saved when the header nests groups
        if header is None:
            ordered = [(str(part[1]), part[2], part[3]) for part in parts]
        else:
            leaf_ids = header._leaf_ids()
            missing = [task_id for task_id in leaf_ids if task_id not in outcomes]
            for meta in self.get_task_metas(missing) if missing else []:
                outcomes[meta["task_id"]] = (meta["status"], meta.get("result"))
            ordered = [(task_id, *outcomes[task_id]) for task_id in leaf_ids]
        for task_id, state, value in ordered:  # the first failed part, in order, is named
            if state in states.PROPAGATE_STATES:
                exc = document.decode_exception(value)
                error = ChordError(f"Dependency {task_id} raised {exc!r}")
                error.__cause__ = exc
                return None, (error, self.get_task_meta(task_id).get("traceback"))
            if state not in states.READY_STATES:
                error = ChordError(
                    f"Dependency {task_id} has no stored result (state {state}); a chord's "
                    "header tasks must store their results (ignore_result=False)"
                )
                return None, (error, None)
        if header is None:
            return [value for _task_id, _state, value in ordered], None
        return _nested_values(header, {task_id: value for task_id, _s, value in ordered}), None


def _nested_values(group: ResultSet, values: dict[str, Any]) -> list[Any]:
    """The parts' values shaped like the header: a nested group gives a list."""
    return [
        _nested_values(member, values) if isinstance(member, ResultSet) else values[member.id]
        for member in group.results
    ]
