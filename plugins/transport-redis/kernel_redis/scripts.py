"""The Lua scripts of the Redis broker: each one step that must not be cut in two.

They act on kombu's key layout (see ``transport``): the ``unacked`` hash (delivery
tag -> ``[payload, exchange, routing_key]``), the ``unacked_index`` sorted set
(delivery tag -> when its consumer last showed it was alive) and a queue's lists
(one per priority step, LPUSH to publish, RPOP to consume); plus one key of kernel's
own, a queue's sorted set of delayed messages.

Every clock reading is the Redis server's (``TIME``), so that consumers on hosts whose
clocks disagree still agree on when a lease expired or a delayed message is due.
Scripts receive their keys fully prefixed (``global_keyprefix``): the transport calls
them through a client that does not prefix.
"""

from __future__ import annotations

#: The server's clock in seconds, as a Lua number (microsecond resolution).
_NOW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
"""

#: Record a delivery: the payload stored under its tag in KEYS[1] (``unacked``), the
#: tag scored with the server's clock in KEYS[2] (``unacked_index``).
#: ARGV: tag, stored value.
HOLD = (
    _NOW
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 1
"""
)

#: Take up to ARGV[1] messages and record their deliveries in one step, so that no
#: moment exists where a message is out of its queue and not yet in ``unacked`` (a
#: consumer or Redis dying then would lose it). Pops (RPOP) from the lists KEYS[3..] in
#: serving order, moving to the next list when one is empty; when ARGV[i + 1] is "1"
#: for the list KEYS[i + 2] (its consumer acks), records each delivery as HOLD does:
#: the payload with its exchange and routing key under its delivery tag in KEYS[1]
#: (``unacked``), the tag scored with the server's clock in KEYS[2]
#: (``unacked_index``). Payloads are stored as they came, never re-encoded. Returns
#: {list number (1-based), payload, 1 if recorded else 0} per message taken, one
#: after the other in one flat list, or nil when every list is empty.
TAKE = """
local limit = tonumber(ARGV[1])
local taken = {}
local count = 0
local now = nil
for i = 3, #KEYS do
    while count < limit do
        local item = redis.call('RPOP', KEYS[i])
        if not item then
            break
        end
        local held = 0
        if ARGV[i - 1] == '1' then
            local ok, message = pcall(cjson.decode, item)
            if ok and type(message) == 'table' and type(message.properties) == 'table'
                    and type(message.properties.delivery_tag) == 'string' then
                local info = message.properties.delivery_info
                if type(info) ~= 'table' then
                    info = {}
                end
                local stored = '[' .. item .. ',' .. cjson.encode(info.exchange) .. ','
                    .. cjson.encode(info.routing_key) .. ']'
                if not now then
                    local time = redis.call('TIME')
                    now = tonumber(time[1]) + tonumber(time[2]) / 1000000
                end
                redis.call('HSET', KEYS[1], message.properties.delivery_tag, stored)
                redis.call('ZADD', KEYS[2], now, message.properties.delivery_tag)
                held = 1
            end
        end
        taken[#taken + 1] = i - 2
        taken[#taken + 1] = item
        taken[#taken + 1] = held
        count = count + 1
    end
end
if count == 0 then
    return nil
end
return taken
"""

#: Show the consumer holding tags ARGV[1..] is alive: their scores in KEYS[1]
#: (``unacked_index``) become the server's clock. ``XX``: a tag acked or restored
#: meanwhile is not added back. Returns how many scores changed.
RENEW = (
    _NOW
    + """
local renewed = 0
for i = 1, #ARGV do
    renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now, ARGV[i])
end
return renewed
"""
)

#: The tags in KEYS[1] (``unacked_index``) not renewed for ARGV[1] seconds, at most
#: ARGV[2] of them, oldest first.
EXPIRED = (
    _NOW
    + """
return redis.call('ZRANGE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'BYSCORE',
    'LIMIT', 0, tonumber(ARGV[2]))
"""
)

#: Put a held message back in its queues, once, whoever asks: only while KEYS[1]
#: (``unacked``) still holds exactly ARGV[2] under tag ARGV[1] (not acked, not restored
#: by another consumer, not redelivered since). Pushes ARGV[3], the payload as it
#: should be delivered next, to each list KEYS[3..]: with LPUSH when ARGV[4] is "1"
#: (the back of the queue, like a new message), else RPUSH (the front, delivered
#: next). A tag left in KEYS[2] (``unacked_index``) without a payload is dropped.
#: Returns 1 when the message was put back, else 0.
RESTORE = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if not stored then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 0
end
if stored ~= ARGV[2] then
    return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 3, #KEYS do
    if ARGV[4] == '1' then
        redis.call('LPUSH', KEYS[i], ARGV[3])
    else
        redis.call('RPUSH', KEYS[i], ARGV[3])
    end
end
return 1
"""

#: Move the due messages of a queue's delayed set KEYS[1] to its lists: at most ARGV[2]
#: of them, whose deliver-at (score) is at or before the server's clock plus ARGV[1]
#: seconds (0, or a tolerance for the lateness of the next poll). A member is
#: "<priority><ARGV[3]><payload>"; it goes (LPUSH, as a publish would) to the list of
#: the highest priority step at or below its priority: steps ARGV[4..] ascending,
#: their lists KEYS[2..] in the same order.
#: Returns {messages moved, deliver-at of the next one still waiting}; Lua drops the
#: second when there is none.
PROMOTE = (
    _NOW
    + """
local due = redis.call('ZRANGE', KEYS[1], '-inf', now + tonumber(ARGV[1]), 'BYSCORE',
    'LIMIT', 0, tonumber(ARGV[2]))
local sep = ARGV[3]
for _, member in ipairs(due) do
    local cut = string.find(member, sep, 1, true)
    local target = KEYS[2]
    local payload = member
    if cut then
        local priority = tonumber(string.sub(member, 1, cut - 1)) or 0
        payload = string.sub(member, cut + #sep)
        for i = 4, #ARGV do
            if tonumber(ARGV[i]) <= priority then
                target = KEYS[i - 2]
            end
        end
    end
    redis.call('LPUSH', target, payload)
    redis.call('ZREM', KEYS[1], member)
end
local following = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, following[2]}
"""
)

#: The server's clock, in seconds (a string: Lua numbers would lose the fraction).
SERVER_TIME = (
    _NOW
    + """
return tostring(now)
"""
)

#: Publish to a direct exchange in one round trip: read its bindings (KEYS[1], members
#: ``routing_key<sep>pattern<sep>queue``) and LPUSH the message to every queue bound
#: with the routing key, each once. kombu reads the bindings, then pushes: two round
#: trips per message. Returns how many queues got it; 0 leaves the message to kombu's
#: own path (no binding: written back from this process's state, or dead-lettered).
#: ARGV: routing key, separator, key prefix, list suffix (priority), message.
PUBLISH_DIRECT = """
local key, sep, prefix, suffix, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local pushed, seen = 0, {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local first = string.find(member, sep, 1, true)
    if first and string.sub(member, 1, first - 1) == key then
        local second = string.find(member, sep, first + #sep, true)
        local queue = second and string.sub(member, second + #sep) or ''
        if queue ~= '' and not seen[queue] then
            seen[queue] = true
            redis.call('LPUSH', prefix .. queue .. suffix, payload)
            pushed = pushed + 1
        end
    end
end
return pushed
"""
