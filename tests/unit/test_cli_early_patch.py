"""``kernel worker -P NAME`` runs the pool's ``early_patch`` before kombu, ssl and the
app are imported (gevent-style monkey-patching must come first)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from kernel.cli.main import scan_pool_option

PROBE_PLUGIN = textwrap.dedent(
    """
    import json, os, sys
    from kernel import hookimpl
    from kernel.plugins.specs import PoolSpec

    def patch():
        watched = ("ssl", "kombu", "amqp", "redis", "kernel.app", "kernel.worker.execute")
        with open(os.environ["PROBE_OUT"], "w") as out:
            json.dump(sorted(name for name in watched if name in sys.modules), out)
        raise SystemExit(0)

    @hookimpl
    def kernel_pools():
        return [PoolSpec(name="probe", factory="kernel.worker.pools:SoloPool",
                         early_patch="probe_pool_plugin:patch")]
    """
)


@pytest.mark.parametrize(
    ("argv", "pool"),
    [
        (["-A", "proj", "worker", "-P", "gevent", "-c", "10"], "gevent"),
        (["worker", "--pool", "gevent"], "gevent"),
        (["worker", "--pool=gevent"], "gevent"),
        (["worker", "-Pgevent"], "gevent"),
        (["worker", "-c", "4"], None),
        (["call", "-P", "x"], None),  # not a worker line
        (["worker", "--", "-P", "gevent"], None),
    ],
)
def test_the_pool_is_found_on_the_command_line(argv, pool):
    assert scan_pool_option(argv) == pool


def test_the_early_patch_runs_before_kombu_ssl_and_the_app_are_imported(tmp_path):
    (tmp_path / "probe_pool_plugin.py").write_text(PROBE_PLUGIN)
    out = tmp_path / "imported.json"
    env = {
        **os.environ,
        "PROBE_OUT": str(out),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "kernel", "--plugin", "probe_pool_plugin", "worker", "-P", "probe"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(out.read_text()) == []
