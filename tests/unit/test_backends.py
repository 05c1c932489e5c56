"""The builtin result backends against the backend contract."""

from __future__ import annotations

import uuid

import pytest

from kernel.testing.contracts import BackendContract


class TestSQLiteBackend(BackendContract):
    cross_process = True

    @pytest.fixture
    def backend_url(self, tmp_path):
        return f"sqlite:///{tmp_path / 'results.sqlite3'}"


class TestMemoryBackend(BackendContract):
    @pytest.fixture
    def backend_url(self):
        return f"cache+memory://{uuid.uuid4().hex}"


@pytest.mark.parametrize(
    ("kernel_class", "module"),
    [
        ("TaskRevokedError", "celery.exceptions"),
        ("WorkerLostError", "billiard.exceptions"),
    ],
)
def test_revoked_and_worker_lost_are_stored_under_celerys_names(kernel_class, module):
    """Celery clients rebuild them as their own classes; kernel reads them back as its own."""
    import kernel.exceptions
    from kernel.backends import document

    cls = getattr(kernel.exceptions, kernel_class)
    encoded = document.encode_exception(cls("why"))
    assert (encoded["exc_module"], encoded["exc_type"]) == (module, kernel_class)
    decoded = document.decode_exception(encoded)
    assert type(decoded) is cls and str(decoded) == "why"


@pytest.fixture
def sqlite_backend(tmp_path):
    from kernel import App

    app = App("polls", broker="memory://", backend=f"sqlite:///{tmp_path / 'results.sqlite3'}")
    yield app.backend
    app.close()


def test_wait_for_polls_1_ms_after_the_first_read_then_doubles_to_default_interval(
    sqlite_backend, pauses
):
    from kernel.exceptions import TimeoutError

    with pytest.raises(TimeoutError):
        sqlite_backend.wait_for(uuid.uuid4().hex, timeout=0.2)
    assert pauses[:6] == [0.001, 0.002, 0.004, 0.008, 0.016, 0.032]
    assert max(pauses) <= sqlite_backend.default_interval


def test_wait_for_with_an_interval_polls_at_that_interval(sqlite_backend, pauses):
    from kernel.exceptions import TimeoutError

    with pytest.raises(TimeoutError):
        sqlite_backend.wait_for(uuid.uuid4().hex, timeout=0.3, interval=0.03)
    assert pauses[:3] == [0.03, 0.03, 0.03]
