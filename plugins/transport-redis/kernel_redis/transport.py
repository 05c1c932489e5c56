"""The Redis broker: kombu's Redis transport with leases, delayed delivery and counts.

Messages, priorities and bindings keep kombu's key layout, so Celery processes share
the queues: a queue is one list per priority step (``<queue>`` and
``<queue>\\x06\\x16<step>``; publish LPUSH, consume RPOP/BRPOP), bindings are sets
``_kombu.binding.<exchange>``, deliveries awaiting their ack live in the ``unacked``
hash and ``unacked_index`` sorted set, and fanout exchanges are pub/sub channels
(a broadcast reaches the queues being consumed when it is sent, as in Celery).

What this transport changes, and why:

- **Taking is recording**: a message leaves its queue and enters ``unacked`` in one
  Lua script (:data:`~kernel_redis.scripts.TAKE`), so a worker or Redis dying between
  the two cannot lose it. A consumer with nothing waiting blocks in BRPOP (Redis has
  no blocking command that both watches several lists and records), records what it
  popped at once, and takes atomically again as long as messages are waiting, as many
  as its prefetch window has room for (at most ``take_batch``) in one round trip; a
  popped message it could not record (Redis went away) goes back to the front of its
  queue.
- **Leases** (:mod:`kernel_redis.leases`): a consuming channel renews the deliveries
  it holds, so a task running longer than ``visibility_timeout`` (30 s here, an hour
  in Celery) is never delivered twice, while a dead worker's messages are back within
  about ``visibility_timeout``.
- **Delayed delivery**: a message whose ``x-deliver-at`` header is in the future waits
  in the sorted set ``<queue>\\x06\\x16delayed`` until a consumer of the queue moves
  it to the queue's list when due, so ETA tasks survive restarts and never occupy a
  worker's prefetch slots.
- **Delivery counts**: a message put back after a delivery that counted as an attempt
  (its consumer died, or rejected it with requeue) carries ``x-delivery-count`` + 1,
  which bounds redelivery of poison messages.
- **Priorities**: 9 is served first, as on AMQP and kernel's other transports (kombu's
  Redis transport serves 0 first); ``priority_lowest_first=True`` restores kombu's order.
- **Queue existence**: an empty declared queue still exists (for ``inspect`` and
  ``queue_declare(passive=True)``); kombu forgets a queue whose lists are empty.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import NoScriptError

from kernel_redis import messages, scripts
from kernel_redis.leases import LeaseKeeper
from kernel_redis.qos import QoS

logger = logging.getLogger(__name__)

#: Options of ``broker_transport_options`` this transport adds to kombu's.
KERNEL_OPTIONS = (
    "priority_lowest_first",
    "delayed_delivery",
    "delayed_poll_interval",
    "restore_batch",
    "take_batch",
)


class LeasedChannel:
    """What kernel adds to a kombu Redis channel (mixed into plain and sentinel ones)."""

    QoS = QoS

    #: Seconds a delivery stays leased without renewal; its consumer renews it every
    #: third of that while it lives.
    visibility_timeout: float = 30
    #: Serve priority 0 first (kombu's Redis order) instead of 9 first.
    priority_lowest_first: bool = False
    #: Hold messages with a future ``x-deliver-at`` in Redis (False: deliver at once,
    #: the consumer holds them; for queues also consumed by Celery workers, which do
    #: not move delayed messages).
    delayed_delivery: bool = True
    #: Seconds between a consumer's looks for newly due delayed messages of a queue.
    delayed_poll_interval: float = 0.5
    #: Most expired leases restored per sweep, and delayed messages moved per look.
    restore_batch: int = 100
    #: Set of the queues declared through this transport (kernel's own key).
    declared_queues_key = "_kernel.queues"
    #: Lease times of kernel's deliveries. Not kombu's ``unacked_index``: Celery
    #: workers never renew theirs, so sweeping it would re-run their long tasks.
    unacked_index_key = "_kernel.leases"
    #: Socket timeouts unless the options give them (kombu's: none), so that a
    #: half-open connection cannot stall lease renewal for minutes.
    socket_timeout: float | None = 10.0
    socket_connect_timeout: float | None = 5.0
    #: Most messages one TAKE hands over while messages are waiting (fewer when the
    #: consumer's prefetch window has less room): one round trip to Redis for a batch
    #: instead of one per message.
    take_batch: int = 32
    #: Oldest Redis that has every command used here (ZRANGE BYSCORE, float BRPOP).
    minimum_redis = (6, 2)

    _keeper: LeaseKeeper | None = None
    _raw: Any = None
    _shared_client: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._keeper_lock = threading.Lock()
        self._next_promotion: dict[str, float] = {}
        self._scripts: dict[str, Any] = {}
        # Taking messages (see the module docstring, "Taking is recording").
        self._taken: set[str] = set()  # tags recorded by TAKE, not yet seen by the QoS
        self._unheld: list[tuple[str, str]] = []  # (full list key, payload) to put back
        self._no_ack_queues: set[str] = set()  # consumed without acks: never recorded
        self._getting_no_ack = False
        self._take_next = True  # False after an empty TAKE: block in BRPOP instead
        self._polling: str | None = None  # the command awaiting its reply: TAKE, BRPOP
        self._poll_queues: list[str] = []  # queue of each list of the pending TAKE
        self._take_sha: str | None = None
        super().__init__(*args, **kwargs)
        self._check_server_version()

    def _check_server_version(self) -> None:
        from kernel.exceptions import ConfigurationError

        version = str(self.raw.info("server").get("redis_version", "0"))
        found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
        if found < self.minimum_redis:
            raise ConfigurationError(
                f"the Redis broker needs Redis {'.'.join(map(str, self.minimum_redis))} or "
                f"later (this server runs {version}); upgrade the server"
            )

    # -- keys and scripts ------------------------------------------------------------

    def full_key(self, key: str) -> str:
        """``key`` with ``global_keyprefix``: what scripts and the raw client need."""
        return f"{self.global_keyprefix or ''}{key}"

    @property
    def raw(self) -> Any:
        """A client that does not prefix keys (kombu's prefixes only some commands),
        on the channel's pool; made again only when kombu replaced the pool."""
        import redis

        pool = self.pool
        client = self._raw
        if client is None or client.connection_pool is not pool:
            client = self._raw = redis.Redis(connection_pool=pool)
        return client

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu builds a new (prefixing) client for every command outside the poller,
        a quarter of a publish's time; clients are thread-safe, so one per pool serves."""
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared

    def run_script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        client = self.raw
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = client.register_script(source)
        return script(keys=keys, args=args, client=client)

    def _delayed_key(self, queue: str) -> str:
        return f"{queue}{self.sep}{messages.DELAYED_SUFFIX}"

    def _serving_steps(self) -> list[int]:
        steps = list(self.priority_steps)
        return steps if self.priority_lowest_first else steps[::-1]

    @contextlib.contextmanager
    def batched_acks(self) -> Iterator[None]:
        """Acknowledgements made inside reach Redis together, in one round trip, when
        the block ends (the worker settles every task that finished since its last
        turn in one). A process that dies inside the block leaves them unacknowledged:
        their messages come back, as for a task that was still running."""
        qos = self.qos
        if qos._ack_batch is not None:  # nested: the outer block sends them
            yield
            return
        qos._ack_batch = []
        try:
            yield
        finally:
            qos.flush_acks()

    # -- leases (the LeaseKeeper's side of the channel) ------------------------------

    def keep_leases(self) -> LeaseKeeper:
        """The channel's lease thread, started on first need (in this process)."""
        keeper = self._keeper
        if keeper is None or not keeper.running:
            with self._keeper_lock:
                keeper = self._keeper
                if keeper is None or not keeper.running:
                    keeper = self._keeper = LeaseKeeper(self, float(self.visibility_timeout))
        return keeper

    def held_tags(self) -> list[str]:
        return list(self.qos._delivered)  # one C-level copy: safe against the consumer

    def renew(self, tags: list[str]) -> int:
        renewed = 0
        index = self.full_key(self.unacked_index_key)
        for start in range(0, len(tags), 500):
            renewed += int(self.run_script(scripts.RENEW, [index], tags[start : start + 500]))
        return renewed

    def remove_held(self, tags: list[str]) -> None:
        with self.raw.pipeline() as pipe:
            for tag in tags:
                pipe.zrem(self.full_key(self.unacked_index_key), tag)
                pipe.hdel(self.full_key(self.unacked_key), tag)
            pipe.execute()

    def restore_expired(self) -> int:
        """Put back the deliveries nobody renewed for ``visibility_timeout``."""
        # Expire a sweep early, so that a message is back within visibility_timeout
        # of its consumer's last renewal (live consumers renew every third of it).
        keeper = self._keeper
        early = keeper.sweep_interval if keeper is not None else 0.0
        tags = self.run_script(
            scripts.EXPIRED,
            [self.full_key(self.unacked_index_key)],
            [max(0.0, float(self.visibility_timeout) - early), int(self.restore_batch)],
        )
        if not tags:
            return 0
        restored = self.restore_tags([bytes_to_str(tag) for tag in tags], attempted=True)
        if restored:
            logger.warning(
                "redis transport: %d message(s) whose consumer stopped renewing their "
                "lease for %ss went back to their queues",
                restored,
                self.visibility_timeout,
            )
        return restored

    def restore_tags(self, tags: list[str], attempted: bool, to_back: bool = False) -> int:
        """Put held deliveries back in their queues, each at most once; how many went."""
        restored = 0
        unacked = self.full_key(self.unacked_key)
        index = self.full_key(self.unacked_index_key)
        for tag in tags:
            stored = self.raw.hget(unacked, tag)
            if stored is None:  # acked, or restored by another consumer meanwhile
                self.raw.zrem(index, tag)
                continue
            try:
                message, exchange, routing_key = messages.read_stored_delivery(stored)
            except ValueError as exc:
                logger.error(
                    "redis transport: the delivery %s in %r is unreadable (%s); it is "
                    "left there for inspection and no longer swept",
                    tag,
                    unacked,
                    exc,
                )
                self.raw.zrem(index, tag)
                continue
            queues = self._lookup(exchange, routing_key)
            if not queues:
                logger.error(
                    "redis transport: no queue is bound to exchange %r with routing key "
                    "%r any more; delivery %s is left in %r for inspection and no longer "
                    "swept",
                    exchange,
                    routing_key,
                    tag,
                    unacked,
                )
                self.raw.zrem(index, tag)
                continue
            priority = self._get_message_priority(message, reverse=False)
            lists = [self.full_key(self._q_for_pri(queue, priority)) for queue in queues]
            payload = dumps(messages.redelivery(message, attempted))
            restored += int(
                self.run_script(
                    scripts.RESTORE,
                    [unacked, index, *lists],
                    [tag, stored, payload, "1" if to_back else "0"],
                )
            )
        return restored

    def _restore(self, message: Any, leftmost: bool = False) -> None:
        self.restore_tags([message.delivery_tag], attempted=False, to_back=leftmost)

    # -- publishing and delayed delivery ---------------------------------------------

    def _put(self, queue: str, message: dict, **kwargs: Any) -> None:
        at = messages.deliver_at(message, queue) if self.delayed_delivery else None
        if at is None or at <= time.time():
            return super()._put(queue, message, **kwargs)
        priority = self.priority(self._get_message_priority(message, reverse=False))
        member = messages.delayed_member(priority, dumps(message), self.sep)
        key = self._delayed_key(queue)
        batch = kwargs.pop("_publish_batch", None)
        if batch is not None:
            batch.add("zadd", key, {member: at})
            return None
        with self.conn_or_acquire() as client:
            client.zadd(key, {member: at})
        return None

    def basic_publish(self, message: dict, exchange: str, routing_key: str, **kwargs: Any) -> Any:
        """Publish; to a direct exchange in one round trip (``PUBLISH_DIRECT``) when
        nothing needs kombu's own path (a batch, queue expiry, a future delivery)."""
        if (
            exchange
            and "_publish_batch" not in kwargs
            and not self._expires
            and self.typeof(exchange).type == "direct"
            and not (self.delayed_delivery and _is_future(message))
        ):
            self._inplace_augment_message(message, exchange, routing_key)
            priority = self.priority(self._get_message_priority(message, reverse=False))
            pushed = self.run_script(
                scripts.PUBLISH_DIRECT,
                [self.full_key(self.keyprefix_queue % (exchange,))],
                [
                    routing_key or "",
                    self.sep,
                    self.global_keyprefix or "",
                    f"{self.sep}{priority}" if priority else "",
                    dumps(message),
                ],
            )
            if pushed:
                return None
            # kombu's own path, without augmenting (encoding the body) a second time
            return self.typeof(exchange).deliver(message, exchange, routing_key, **kwargs)
        return super().basic_publish(message, exchange, routing_key, **kwargs)

    def promote_due(self, queues: list[str], force: bool = False) -> float:
        """Move the due delayed messages of ``queues`` to their lists, for queues whose
        turn came; seconds until the next turn of any of them."""
        now = time.monotonic()
        steps = list(self.priority_steps)
        soonest = float(self.delayed_poll_interval)
        for queue in queues:
            turn = self._next_promotion.get(queue, 0.0)
            if not force and now < turn:
                soonest = min(soonest, turn - now)
                continue
            lists = [self.full_key(self._q_for_pri(queue, step)) for step in steps]
            reply = self.run_script(
                scripts.PROMOTE,
                [self.full_key(self._delayed_key(queue)), *lists],
                [0, int(self.restore_batch), self.sep, *steps],
            )
            moved = reply[0]
            following = reply[1] if len(reply) > 1 else None  # Lua drops a trailing nil
            wait = float(self.delayed_poll_interval)
            if int(moved) >= int(self.restore_batch):
                wait = 0.0  # more are due: look again at once
            elif following is not None:
                wait = min(wait, max(0.0, float(following) - time.time()))
            self._next_promotion[queue] = now + wait
            soonest = min(soonest, wait)
        return soonest

    def _promote_quietly(self, queues: list[str]) -> float:
        """``promote_due`` for the consuming loop: a refused script (e.g. Redis out of
        memory with ``noeviction``) must not stop consuming what is ready."""
        try:
            return self.promote_due(queues)
        except self.ResponseError as exc:
            logger.warning(
                "redis transport: could not move due delayed messages of %s (%s); retrying in %ss",
                ", ".join(queues),
                exc,
                self.delayed_poll_interval,
            )
            return float(self.delayed_poll_interval)

    # -- consuming -------------------------------------------------------------------

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("no_ack", args[0] if args else False):
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        tag = super().basic_consume(queue, *args, **kwargs)
        if queue not in self._fanout_queues:
            self.keep_leases()  # also sweeps: an idle consumer restores a dead one's work
        return tag

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        self._getting_no_ack = no_ack  # read by _get: a no-ack get is never recorded
        try:
            return super().basic_get(queue, no_ack=no_ack, **kwargs)
        finally:
            self._getting_no_ack = False

    def was_taken(self, delivery_tag: str) -> bool:
        """True (once) when TAKE already recorded this delivery: the QoS skips HOLD."""
        if delivery_tag in self._taken:
            self._taken.discard(delivery_tag)
            return True
        return False

    def _take_keys(self, lists: list[str]) -> list[str]:
        return [
            self.full_key(self.unacked_key),
            self.full_key(self.unacked_index_key),
            *(self.full_key(key) for key in lists),
        ]

    def _taken_messages(self, reply: list[Any], queues: list[str]) -> list[tuple[dict, str]]:
        """The messages and queues of a TAKE reply; recorded deliveries are noted."""
        taken = []
        for start in range(0, len(reply), 3):
            number, item, held = reply[start : start + 3]
            message = loads(bytes_to_str(item))
            if int(held):
                self._taken.add(message["properties"]["delivery_tag"])
            taken.append((message, queues[int(number) - 1]))
        return taken

    def _take_limit(self, queues: list[str]) -> int:
        """How many messages the next TAKE may hand over: the room left in the
        consumer's prefetch window, at most ``take_batch``; one at a time when a
        queue is consumed without acks (no window counts those)."""
        if self._no_ack_queues.intersection(queues):
            return 1
        room = self.qos.can_consume_max_estimate()  # None: no window
        return self.take_batch if room is None else max(1, min(self.take_batch, room))

    def _hold_popped(self, key: str, item: str, message: dict, queue: str) -> None:
        """Record a delivery BRPOP popped. If Redis went away meanwhile, keep the
        payload to put back at the front of its queue once Redis answers again."""
        properties = message.get("properties")
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        if queue in self._no_ack_queues or not isinstance(tag, str):
            return
        try:
            self.hold(tag, message)
        except self.connection_errors as exc:
            self._unheld.append((self.full_key(key), item))
            logger.warning(
                "redis transport: a message popped from %r could not be recorded (%s); "
                "it goes back to the front of its queue when Redis answers again",
                queue,
                exc,
            )
            raise
        self._taken.add(tag)

    def hold(self, delivery_tag: str, message: dict) -> None:
        """Record a delivery taken without TAKE: payload in ``unacked``, lease scored."""
        self.run_script(
            scripts.HOLD,
            [self.full_key(self.unacked_key), self.full_key(self.unacked_index_key)],
            [delivery_tag, messages.stored_delivery(message)],
        )

    def _put_back_unheld(self) -> None:
        """Return popped messages that were never recorded (see ``_hold_popped``)."""
        while self._unheld:
            key, item = self._unheld[0]
            self.raw.rpush(key, item)  # the front: delivered next, as if never taken
            self._unheld.pop(0)
            logger.info("redis transport: a popped message went back to %r", key)

    def _get(self, queue: str) -> dict:
        if self.delayed_delivery:
            self.promote_due([queue])
        self._put_back_unheld()
        lists = [self._q_for_pri(queue, step) for step in self._serving_steps()]
        flag = "0" if self._getting_no_ack else "1"
        reply = self.run_script(scripts.TAKE, self._take_keys(lists), [1] + [flag] * len(lists))
        if not reply:
            raise Empty()
        return self._taken_messages(reply, [queue] * len(lists))[0][0]

    def _take_script(self) -> str:
        if self._take_sha is None:
            self._take_sha = str(self.raw.script_load(scripts.TAKE))
        return self._take_sha

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Ask Redis for the next message on the polling connection: TAKE while
        messages are waiting, BRPOP (blocking) once TAKE found every list empty."""
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        if not timeout:
            timeout = self.brpop_timeout
        if self.delayed_delivery:
            timeout = min(timeout, self._promote_quietly(queues))
        self._put_back_unheld()
        pairs = [
            (self._q_for_pri(queue, step), queue)
            for step in self._serving_steps()
            for queue in queues
        ]
        connection = self.client.connection
        if self._take_next:
            sha = self._take_script()
            keys = self._take_keys([key for key, _ in pairs])
            flags = ["0" if queue in self._no_ack_queues else "1" for _, queue in pairs]
            command = ["EVALSHA", sha, len(keys), *keys, self._take_limit(queues), *flags]
            self._poll_queues = [queue for _, queue in pairs]
            self._polling = "TAKE"
        else:
            # BRPOP 0 would block for ever; Redis >= 6 takes fractions of a second.
            timeout = max(0.01, round(float(timeout), 3))
            command = ["BRPOP", *(key for key, _ in pairs), timeout]
            if self.global_keyprefix:
                command = self.client._prefix_args(command)
            self._polling = "BRPOP"
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()
        connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> bool:
        """Deliver the reply of the command ``_brpop_start`` sent (raises Empty when
        there was nothing)."""
        polling, self._polling = self._polling, None
        connection = self.client.connection
        try:
            try:
                reply = self.client.parse_response(connection, polling or "BRPOP", **options)
            except self.connection_errors:
                connection.disconnect()  # the next poll connects again
                raise
            except NoScriptError:  # Redis restarted: load the script again
                self._take_sha = None
                raise Empty() from None
            if not reply:
                self._take_next = False  # nothing waiting: block in BRPOP next
                raise Empty()
            self._take_next = True  # more may be waiting: take atomically again
            if polling == "TAKE":
                taken = self._taken_messages(reply, self._poll_queues)
            else:
                key, item = bytes_to_str(reply[0]), bytes_to_str(reply[1])
                queue = key.rsplit(self.sep, 1)[0]
                message = loads(item)
                self._hold_popped(key, item, message, queue)
                taken = [(message, queue)]
            self._queue_cycle.rotate(taken[-1][1])
            self._deliver_taken(taken)
            return True
        finally:
            self._in_poll = None
            reauth = getattr(self, "_flush_brpop_reauth", None)
            if reauth is not None:
                reauth()

    def _deliver_taken(self, taken: list[tuple[dict, str]]) -> None:
        """Hand messages over in the order taken. If handing one over fails, the ones
        not handed over yet go back to the front of their queues (not counted as an
        attempt) instead of waiting out their lease."""
        for position, (message, queue) in enumerate(taken):
            try:
                self.connection._deliver(message, queue)
            except BaseException:
                tags = (m["properties"]["delivery_tag"] for m, _ in taken[position + 1 :])
                rest = [tag for tag in tags if tag in self._taken]  # recorded by TAKE
                if rest:
                    self._taken.difference_update(rest)
                    with contextlib.suppress(*self.connection_errors):
                        self.restore_tags(list(reversed(rest)), attempted=False)
                raise

    # -- queues ----------------------------------------------------------------------

    def get_table(self, exchange: str) -> list[tuple]:
        """The exchange's bindings; ones this process declared are written back if
        Redis lost them (a restart without persistence), instead of dropping what is
        published to the exchange."""
        table = super().get_table(exchange)
        if table:
            return table
        # kombu's state keys this process's bindings (queue, exchange, routing_key).
        known = [
            (routing_key, "", queue)
            for queue, bound_to, routing_key in list(self.state.bindings)
            if bound_to == exchange
        ]
        if known:
            logger.warning(
                "redis transport: the bindings of exchange %r were missing from Redis "
                "(restarted without persistence?); declaring them again: %s",
                exchange,
                ", ".join(queue for _rk, _p, queue in known),
            )
            for routing_key, pattern, queue in known:
                self._queue_bind(exchange, routing_key, pattern, queue)
                self._new_queue(queue)
        return known

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        super()._new_queue(queue, **kwargs)
        with self.conn_or_acquire() as client:
            client.sadd(self.declared_queues_key, queue)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        raw = self.raw
        with raw.pipeline() as pipe:
            for step in self.priority_steps:
                pipe.exists(self.full_key(self._q_for_pri(queue, step)))
            pipe.exists(self.full_key(self._delayed_key(queue)))
            pipe.sismember(self.full_key(self.declared_queues_key), queue)
            return any(pipe.execute())

    def _purge(self, queue: str) -> int:
        """Ready and delayed messages (both are waiting); deliveries being worked on stay."""
        ready = super()._purge(queue)
        key = self.full_key(self._delayed_key(queue))
        with self.raw.pipeline() as pipe:
            pipe.zcard(key)
            pipe.delete(key)
            delayed = pipe.execute()[0]
        return int(ready) + int(delayed or 0)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        super()._delete(queue, *args, **kwargs)
        with self.raw.pipeline() as pipe:
            pipe.srem(self.full_key(self.declared_queues_key), queue)
            pipe.delete(self.full_key(self._delayed_key(queue)))
            pipe.execute()

    def close(self) -> None:
        if self._unheld:
            try:
                self._put_back_unheld()
            except self.connection_errors as exc:
                logger.error(
                    "redis transport: Redis is unreachable (%s); %d popped message(s) that "
                    "were never recorded are lost with this channel",
                    exc,
                    len(self._unheld),
                )
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.stop()
            self._flush_deferred_acks(keeper)
        super().close()

    def _flush_deferred_acks(self, keeper: LeaseKeeper, within: float = 5.0) -> None:
        """Acks that failed during an outage must not be forgotten at shutdown: their
        tasks finished, and would run again."""
        deadline = time.monotonic() + within
        while keeper.deferred_acks():
            try:
                keeper.flush_deferred_acks(self)
            except self.connection_errors as exc:
                if time.monotonic() >= deadline:
                    logger.error(
                        "redis transport: Redis is still unreachable (%s); the acks of "
                        "finished deliveries %s were not sent and those tasks will run "
                        "again",
                        exc,
                        ", ".join(keeper.deferred_acks()),
                    )
                    return
                time.sleep(0.2)


def _is_future(message: dict) -> bool:
    """True when the message has an ``x-deliver-at`` still to come."""
    at = messages.deliver_at(message, "")
    return at is not None and at > time.time()


class Channel(LeasedChannel, kombu_redis.Channel):
    """A channel of ``redis://``, ``rediss://`` and ``redis+socket://`` connections."""

    from_transport_options = kombu_redis.Channel.from_transport_options + KERNEL_OPTIONS


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with kernel's channel (see the module docstring)."""

    Channel = Channel


class TLSChannel(Channel):
    """A channel of ``rediss://`` connections: TLS options are required, not guessed."""

    def _connparams(self, asynchronous: bool = False) -> dict:
        if not self.connection.client.ssl:
            from kernel.exceptions import ConfigurationError

            raise ConfigurationError(
                "a rediss:// broker URL needs its TLS options: add "
                "?ssl_cert_reqs=required (or optional, or none to skip verifying the "
                "server) and, as needed, ssl_ca_certs=/path/ca.pem, ssl_certfile=..., "
                "ssl_keyfile=... to the URL, or set broker_use_ssl to a dict of those options"
            )
        return super()._connparams(asynchronous)


class TLSTransport(Transport):
    """``rediss://``: Redis over TLS."""

    Channel = TLSChannel


class SentinelChannel(LeasedChannel, kombu_redis.SentinelChannel):
    """A channel of ``sentinel://`` connections (``master_name`` transport option)."""

    from_transport_options = kombu_redis.SentinelChannel.from_transport_options + KERNEL_OPTIONS


class SentinelTransport(kombu_redis.SentinelTransport):
    """Redis through Sentinel: ``sentinel://host:26379;sentinel://host2:26379``."""

    Channel = SentinelChannel
