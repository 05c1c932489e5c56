"""Redis URLs, parsed once and turned into redis-py connection options.

Pure functions: nothing here connects. The forms understood::

    redis://[[username]:password@]host[:port][/db][?option=value&...]
    rediss://...                                  (TLS, same form)
    redis+socket:///path/to/redis.sock[?db=N&...]
    sentinel://host:port[/db];sentinel://host2:port2   (master_name from the options)

Query options (``socket_timeout=5``, ``ssl_cert_reqs=required``...) override the same
keys given as transport options; an option this module does not know is an error
naming the ones it does, so a typo does not silently fall back to a default.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs

from kernel.exceptions import ConfigurationError

SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

EXAMPLES = {
    "redis": "redis://:password@localhost:6379/0",
    "rediss": "rediss://:password@redis.example.com:6380/0?ssl_cert_reqs=required",
    "redis+socket": "redis+socket:///var/run/redis/redis.sock?db=0",
    "sentinel": "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0 with the transport "
    "option master_name='mymaster'",
}

_CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "cert_required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "cert_optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
    "cert_none": ssl.CERT_NONE,
}


class InvalidRedisURL(ConfigurationError):
    """A Redis URL or connection option that cannot be used as given."""


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


def _to_cert_reqs(value: Any) -> ssl.VerifyMode:
    if isinstance(value, ssl.VerifyMode):
        return value
    try:
        return _CERT_REQS[str(value).strip().lower()]
    except KeyError:
        raise ValueError(f"{value!r} is not one of required, optional, none") from None


#: Connection options accepted in the URL query and in the transport options, with
#: the conversion applied to a string value.
CONNECTION_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "socket_keepalive": _to_bool,
    "health_check_interval": float,
    "retry_on_timeout": _to_bool,
    "max_connections": int,
    "client_name": str,
    "username": str,
    "password": str,
    "ssl_cert_reqs": _to_cert_reqs,
    "ssl_ca_certs": str,
    "ssl_ca_path": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": _to_bool,
}
_DB_OPTIONS = ("db", "virtual_host")  # virtual_host: kombu's name for the database number


@attrs.frozen
class RedisURL:
    """Where a Redis server is, as a URL names it."""

    scheme: str
    #: ``(host, port)``: one for redis/rediss, every sentinel for sentinel.
    addresses: tuple[tuple[str, int], ...] = ()
    socket_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    #: Connection options from the query string, converted.
    options: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"


def _fail(url: str, problem: str, scheme: str | None = None) -> InvalidRedisURL:
    from kernel.plugins.manager import redact_url

    example = EXAMPLES.get(scheme or "", EXAMPLES["redis"])
    return InvalidRedisURL(
        f"invalid Redis URL {redact_url(url)!r}: {problem}; for example {example}"
    )


def convert_option(name: str, value: Any) -> Any:
    """``value`` of connection option ``name`` in the type redis-py wants."""
    convert = CONNECTION_OPTIONS[name]
    if value is None or (convert is not str and not isinstance(value, str)):
        return value
    return convert(value)


def _query_options(url: str, scheme: str, query: str) -> tuple[int | None, dict[str, Any]]:
    db: int | None = None
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _DB_OPTIONS:
            try:
                db = int(value.strip("/"))
            except ValueError:
                raise _fail(url, f"database {value!r} is not a number", scheme) from None
            continue
        if name == "password":  # kept out of the query, where redaction would miss it
            raise _fail(url, "put the password before the host (:password@host)", scheme)
        if name not in CONNECTION_OPTIONS:
            known = ", ".join(sorted([*CONNECTION_OPTIONS, "db"]))
            raise _fail(url, f"unknown option {name!r} (known: {known})", scheme)
        if name.startswith("ssl_") and scheme in ("redis", "redis+socket"):
            raise _fail(url, f"{name} needs TLS: use rediss:// instead of {scheme}://", "rediss")
        try:
            options[name] = convert_option(name, unquote(value))
        except ValueError as exc:
            raise _fail(url, f"option {name}: {exc}", scheme) from None
    return db, options


def _address(url: str, part: Any, scheme: str, default_port: int) -> tuple[str, int]:
    try:
        port = part.port
    except ValueError:
        netloc = part.netloc.rpartition("@")[2]
        raise _fail(url, f"port in {netloc!r} is not a number from 1 to 65535", scheme) from None
    return part.hostname or "localhost", port or default_port


def _db_from_path(url: str, path: str, scheme: str) -> int:
    text = path.strip("/")
    if not text:
        return 0
    try:
        db = int(text)
    except ValueError:
        raise _fail(url, f"database {text!r} is not a number", scheme) from None
    if db < 0:
        raise _fail(url, f"database {db} is negative", scheme)
    return db


def parse(url: str) -> RedisURL:
    """Parse a Redis URL; raise :class:`InvalidRedisURL` saying what is wrong."""
    if not isinstance(url, str) or "://" not in url:
        raise _fail(str(url), "expected scheme://..., with a scheme among " + ", ".join(SCHEMES))
    scheme = url.partition("://")[0].lower()
    if scheme == "sentinel":
        return _parse_sentinel(url)
    if scheme not in SCHEMES:
        raise _fail(url, f"unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    part = urlsplit(url)
    db, options = _query_options(url, scheme, part.query)
    username = unquote(part.username) if part.username else None
    password = unquote(part.password) if part.password else None
    if scheme == "redis+socket":
        path = unquote(part.path)
        if part.hostname or not path or path == "/":
            raise _fail(url, "give the socket's absolute path after three slashes", "redis+socket")
        return RedisURL(
            scheme,
            socket_path=path,
            db=db or 0,
            username=username,
            password=password,
            options=options,
        )
    address = _address(url, part, scheme, DEFAULT_PORT)
    path_db = _db_from_path(url, part.path, scheme)
    return RedisURL(
        scheme,
        addresses=(address,),
        db=path_db if db is None else db,
        username=username,
        password=password,
        options=options,
    )


def _parse_sentinel(url: str) -> RedisURL:
    addresses: list[tuple[str, int]] = []
    db: int | None = None
    username = password = None
    options: dict[str, Any] = {}
    for piece in filter(None, (p.strip() for p in url.split(";"))):
        if not piece.lower().startswith("sentinel://"):
            raise _fail(url, f"{piece!r} in a sentinel list does not start with sentinel://")
        part = urlsplit(piece)
        if not part.hostname:
            raise _fail(url, f"{piece!r} names no sentinel host", "sentinel")
        addresses.append(_address(url, part, "sentinel", DEFAULT_SENTINEL_PORT))
        query_db, query_options = _query_options(url, "sentinel", part.query)
        options.update(query_options)
        piece_db = query_db if query_db is not None else _db_from_path(url, part.path, "sentinel")
        if db is None and (query_db is not None or part.path.strip("/")):
            db = piece_db
        username = username or (unquote(part.username) if part.username else None)
        password = password or (unquote(part.password) if part.password else None)
    if not addresses:
        raise _fail(url, "no sentinel address", "sentinel")
    return RedisURL(
        "sentinel",
        addresses=tuple(addresses),
        db=db or 0,
        username=username,
        password=password,
        options=options,
    )


def connection_options(target: RedisURL, transport_options: Mapping[str, Any]) -> dict[str, Any]:
    """redis-py connection keyword arguments: transport options, then the URL's.

    Transport options that are not connection options (``master_name``,
    ``global_keyprefix``...) are left out; the caller reads those itself.
    """
    options: dict[str, Any] = {}
    for name, value in transport_options.items():
        if name in CONNECTION_OPTIONS:
            try:
                options[name] = convert_option(name, value)
            except ValueError as exc:
                raise InvalidRedisURL(f"transport option {name}: {exc}") from None
    options.update(target.options)
    options["db"] = target.db
    if target.username:
        options["username"] = target.username
    if target.password:
        options["password"] = target.password
    if not target.tls and target.scheme != "sentinel":
        stray = sorted(name for name in options if name.startswith("ssl_"))
        if stray:
            raise InvalidRedisURL(
                f"{', '.join(stray)} given for a {target.scheme}:// URL; TLS options need "
                f"rediss://, for example {EXAMPLES['rediss']}"
            )
    if target.tls:
        options.setdefault("ssl_cert_reqs", ssl.CERT_REQUIRED)
    return options
