"""Service tests skip on a user's machine and fail under KERNEL_REQUIRE_SERVICES=1."""

import socket

import pytest

from kernel.testing import services


@pytest.fixture
def closed_port(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setitem(services.SERVICES, "redis", ("127.0.0.1", port))
    return port


def test_missing_server_skips_with_a_reason_naming_it(closed_port, monkeypatch):
    monkeypatch.delenv("KERNEL_REQUIRE_SERVICES", raising=False)
    with pytest.raises(
        pytest.skip.Exception, match=f"redis server is not reachable on 127.0.0.1:{closed_port}"
    ):
        services.require_service("redis")


def test_missing_server_fails_when_services_are_required(closed_port, monkeypatch):
    monkeypatch.setenv("KERNEL_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="KERNEL_REQUIRE_SERVICES=1"):
        services.require_service("redis")


def test_running_server_returns_its_address(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        monkeypatch.setitem(services.SERVICES, "redis", sock.getsockname())
        assert services.require_service("redis") == sock.getsockname()


def test_unknown_service_name_is_an_error():
    with pytest.raises(ValueError, match="unknown service 'redsi'"):
        services.require_service("redsi")
