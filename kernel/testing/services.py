"""Tests that need a real server: skip with a reason, or fail when CI requires them.

``require_service("redis")`` returns the server's address when something answers on
its loopback port. Otherwise it skips the test, naming the server, unless
``KERNEL_REQUIRE_SERVICES=1`` (set by ``.ci/run``), which makes it fail instead so a
missing server can never turn a CI run green by skipping.
"""

from __future__ import annotations

import os
import socket

import pytest

#: Loopback servers the test suites use, as the development machines run them.
SERVICES: dict[str, tuple[str, int]] = {
    "redis": ("127.0.0.1", 6379),
    "rabbitmq": ("127.0.0.1", 5672),
    "postgres": ("127.0.0.1", 5432),
    "mariadb": ("127.0.0.1", 3306),
}

CONNECT_TIMEOUT = 1.0


def reachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def services_required() -> bool:
    return os.environ.get("KERNEL_REQUIRE_SERVICES", "").strip() in ("1", "true", "yes")


def require_service(name: str) -> tuple[str, int]:
    """Return ``(host, port)`` of a running server, or skip/fail the calling test."""
    try:
        host, port = SERVICES[name]
    except KeyError:
        raise ValueError(f"unknown service {name!r}; known: {', '.join(SERVICES)}") from None
    if reachable(host, port):
        return host, port
    message = f"{name} server is not reachable on {host}:{port}"
    if services_required():
        pytest.fail(
            f"{message} and KERNEL_REQUIRE_SERVICES=1; start it with ../shared/services.sh {name}",
            pytrace=False,
        )
    pytest.skip(f"{message}; start it to run this test")
    raise AssertionError("unreachable")  # pytest.skip raised
