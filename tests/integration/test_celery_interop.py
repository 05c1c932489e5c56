"""Wire compatibility with real Celery: messages both ways, and stored results both ways.

Celery reaches the SQLite broker through kombu's ``broker_transport`` option naming
our transport class, exactly as a migrating user would point it at a shared broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

celery = pytest.importorskip("celery")
celery_backends = pytest.importorskip("celery.backends.base")
celery_result = pytest.importorskip("celery.result")

from kernel import App  # noqa: E402
from kernel.backends.base import KeyValueBackend  # noqa: E402
from kernel.testing.pytest_plugin import start_worker, stop_worker  # noqa: E402

from .conftest import wait_until  # noqa: E402

TRANSPORT = "kernel.plugins.builtin.sqlite_transport:Transport"

pytestmark = pytest.mark.integration


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/shared.sqlite3"


def celery_app(url: str) -> celery.Celery:
    app = celery.Celery("interop", broker=url, set_as_current=False)
    app.conf.broker_transport = TRANSPORT
    return app


def test_celery_client_task_runs_on_a_kernel_worker(url, kernel_plugins):
    kapp = App("k", broker=url, backend=url, plugins=kernel_plugins)
    seen = {}

    @kapp.task(name="interop.combine", bind=True)
    def combine(self, a, b, sep="-"):
        seen.update(id=self.request.id, root_id=self.request.root_id, retries=self.request.retries)
        return f"{a}{sep}{b}"

    worker, thread = start_worker(kapp)
    try:
        sent = celery_app(url).send_task("interop.combine", ("x", "y"), {"sep": "+"})
        assert kapp.AsyncResult(sent.id).get(timeout=20) == "x+y"
        assert seen == {"id": sent.id, "root_id": sent.id, "retries": 0}
        delayed = celery_app(url).send_task("interop.combine", (1, 2), countdown=1)
        assert kapp.AsyncResult(delayed.id).get(timeout=20) == "1-2"
    finally:
        stop_worker(worker, thread)
        kapp.close()


def test_kernel_client_task_runs_on_a_celery_worker(url, tmp_path, kernel_plugins):
    record = tmp_path / "celery-ran.json"
    (tmp_path / "celery_side.py").write_text(
        textwrap.dedent(f"""
        import json
        from celery import Celery

        app = Celery("celery_side", broker={url!r})
        app.conf.broker_transport = {TRANSPORT!r}

        @app.task(name="interop.store", bind=True)
        def store(self, a, b, label=None):
            with open({str(record)!r}, "w") as handle:
                json.dump({{"args": [a, b], "label": label, "id": self.request.id,
                           "root_id": self.request.root_id}}, handle)
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    log = open(tmp_path / "celery-worker.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_side",
            "worker",
            "-P",
            "solo",
            "-l",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    kapp = App("k", broker=url, backend=None, plugins=kernel_plugins)
    try:
        sent = kapp.send_task("interop.store", (1, [2, 3]), {"label": "from kernel"})
        wait_until(record.exists, 60, "the Celery worker to run the kernel message")
        ran = json.loads(wait_until(lambda: record.read_text() or None, 10, "the record"))
        assert ran == {
            "args": [1, [2, 3]],
            "label": "from kernel",
            "id": sent.id,
            "root_id": sent.id,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        kapp.close()


class SharedStore:
    """The key-value store both sides write to, as a shared Redis would be."""

    def __init__(self) -> None:
        self.data: dict[str, bytes | str] = {}


class CeleryDictBackend(celery_backends.KeyValueStoreBackend):
    def __init__(self, app, store: SharedStore, **kwargs):
        super().__init__(app, **kwargs)
        self.store = store

    def get(self, key):
        return self.store.data.get(key.decode() if isinstance(key, bytes) else key)

    def set(self, key, value):
        self.store.data[key.decode() if isinstance(key, bytes) else key] = value

    def mget(self, keys):
        return [self.get(k) for k in keys]

    def delete(self, key):
        self.store.data.pop(key.decode() if isinstance(key, bytes) else key, None)


class KernelDictBackend(KeyValueBackend):
    def __init__(self, app, store: SharedStore):
        super().__init__(app, "dict://")
        self.store = store

    def get(self, key):
        return self.store.data.get(key)

    def set(self, key, value, expires):
        self.store.data[key] = value

    def delete(self, key):
        self.store.data.pop(key, None)


@pytest.fixture
def both_backends(kernel_plugins):
    store = SharedStore()
    capp = celery.Celery("c", set_as_current=False)
    kapp = App("k", broker="memory://", plugins=kernel_plugins)
    kapp.finalize()
    return (CeleryDictBackend(capp, store), capp), (KernelDictBackend(kapp, store), kapp)


def test_celery_reads_results_kernel_stored(both_backends):
    (celery_backend, capp), (kernel_backend, _kapp) = both_backends
    kernel_backend.mark_as_done("ok-1", {"answer": [4, 2]})
    try:
        raise LookupError("no such thing")
    except LookupError as exc:
        kernel_backend.mark_as_failure("bad-1", exc, "Traceback (most recent call last): ...")
    done = celery_result.AsyncResult("ok-1", backend=celery_backend, app=capp)
    assert done.state == "SUCCESS" and done.result == {"answer": [4, 2]}
    assert done.date_done is not None
    failed = celery_result.AsyncResult("bad-1", backend=celery_backend, app=capp)
    assert failed.state == "FAILURE"
    assert isinstance(failed.result, LookupError)
    assert str(failed.result) == "no such thing"
    assert failed.traceback.startswith("Traceback")


def test_kernel_reads_results_celery_stored(both_backends):
    (celery_backend, _capp), (_kernel_backend, kapp) = both_backends
    kapp._backend = _kernel_backend
    celery_backend.store_result("ok-2", [1, "two", None], "SUCCESS")
    celery_backend.store_result(
        "bad-2", ValueError("bad value"), "FAILURE", traceback="Traceback: celery side"
    )
    celery_backend.store_result("prog-2", {"done": 3}, "PROGRESS")
    assert kapp.AsyncResult("ok-2").get(timeout=1) == [1, "two", None]
    failed = kapp.AsyncResult("bad-2")
    with pytest.raises(ValueError, match="bad value"):
        failed.get(timeout=1)
    assert failed.traceback == "Traceback: celery side"
    assert kapp.AsyncResult("prog-2").state == "PROGRESS"
    assert kapp.AsyncResult("prog-2").info == {"done": 3}
