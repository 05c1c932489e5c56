"""Canvas across Celery and kernel: chains and groups built by one run on the other.

Both share the embedded SQLite broker (Celery reaches it through kombu's
``broker_transport`` option naming our transport); results are read on the kernel
side, or recorded by the Celery worker's tasks in a file.
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

from kernel import App, chain, group  # noqa: E402
from kernel.testing.pytest_plugin import start_worker, stop_worker  # noqa: E402

from .conftest import wait_until  # noqa: E402

TRANSPORT = "kernel.plugins.builtin.sqlite_transport:Transport"

pytestmark = pytest.mark.integration


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/shared.sqlite3"


def celery_client(url: str) -> celery.Celery:
    app = celery.Celery("interop", broker=url, set_as_current=False)
    app.conf.broker_transport = TRANSPORT
    return app


@pytest.fixture
def kernel_side(url, kernel_plugins):
    kapp = App("k", broker=url, backend=url, plugins=kernel_plugins)

    @kapp.task(name="interop.add")
    def add(x, y):
        return x + y

    worker, thread = start_worker(kapp, pool="threads", concurrency=2)
    yield kapp
    stop_worker(worker, thread)
    kapp.close()


def test_celery_chain_runs_on_kernel_workers(url, kernel_side):
    client = celery_client(url)
    flow = celery.chain(
        client.signature("interop.add", (1, 2)),
        client.signature("interop.add", (3,)),
        client.signature("interop.add", (4,)),
    )
    last = flow.apply_async()
    assert kernel_side.AsyncResult(last.id).get(timeout=30) == 10


def test_celery_group_runs_on_kernel_workers_in_order(url, kernel_side):
    client = celery_client(url)
    sent = celery.group(client.signature("interop.add", (i, i)) for i in range(6)).apply_async()
    values = [kernel_side.AsyncResult(r.id).get(timeout=30) for r in sent.results]
    assert values == [2 * i for i in range(6)]


def test_kernel_chain_runs_on_a_celery_worker(url, tmp_path, kernel_plugins):
    record = tmp_path / "chain.json"
    (tmp_path / "celery_side.py").write_text(
        textwrap.dedent(f"""
        import json
        from celery import Celery

        app = Celery("celery_side", broker={url!r})
        app.conf.broker_transport = {TRANSPORT!r}

        @app.task(name="interop.add")
        def add(x, y):
            return x + y

        @app.task(name="interop.keep", bind=True)
        def keep(self, value):
            with open({str(record)!r}, "w") as handle:
                json.dump({{"value": value, "id": self.request.id}}, handle)
        """)
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    log = open(tmp_path / "celery-worker.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_side", "worker", "-P", "solo",
         "-l", "INFO", "--without-mingle", "--without-gossip", "--without-heartbeat"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    kapp = App("k", broker=url, backend=None, plugins=kernel_plugins)
    try:
        flow = chain(
            kapp.signature("interop.add", (1, 2)),
            kapp.signature("interop.add", (10,)),
            kapp.signature("interop.keep"),
        )
        last = flow.apply_async()
        wait_until(record.exists, 60, "the Celery worker to finish the kernel chain")
        ran = json.loads(wait_until(lambda: record.read_text() or None, 10, "the record"))
        assert ran == {"value": 13, "id": last.id}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        kapp.close()


def test_kernel_group_members_carry_celerys_group_headers(url, kernel_plugins):
    kapp = App("k", broker=url, backend=url, plugins=kernel_plugins)
    try:
        sent = group(kapp.signature("interop.add", (i, i)) for i in range(3)).apply_async()
        client = celery_client(url)
        with client.connection_for_read() as connection:
            queue = connection.SimpleQueue("celery")
            seen = []
            for _ in range(3):
                message = queue.get(timeout=10)
                seen.append((message.headers["group"], message.headers["group_index"]))
                message.ack()
            queue.close()
        assert seen == [(sent.id, i) for i in range(3)]
    finally:
        kapp.close()
