"""The gevent pool in-process: the pool contract (in a monkey-patched pytest process,
since this one is not), and its refusal to run unpatched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kernel import App
from kernel.exceptions import ConfigurationError
from kernel.plugins.manager import PluginManager

HERE = Path(__file__).parent

#: Runs pytest on the contract after patching, as ``kernel worker -P gevent`` does.
PATCHED_PYTEST = (
    "from gevent import monkey; monkey.patch_all()\n"
    "import sys, pytest\n"
    "sys.exit(pytest.main(sys.argv[1:]))\n"
)


def test_the_pool_contract_passes_in_a_patched_process(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PATCHED_PYTEST,
            str(HERE / "gevent_contract.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "-rs",
            f"--basetemp={tmp_path / 'contract'}",
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert " passed" in output and "skipped" not in output, output


def test_the_pool_is_registered_with_what_it_supports():
    spec = PluginManager().load().pool("gevent")
    assert spec.supports == {
        "soft_time_limit",
        "hard_time_limit",
        "terminate",
        "terminate_task",
        "autoscale",
    }
    assert spec.early_patch == "kernel_gevent.patch:patch"
    assert spec.default_concurrency() == 100


def test_an_unpatched_process_is_refused_with_the_fix():
    from kernel_gevent.pool import GeventPool

    class FakeWorker:
        app = App("unpatched", broker="memory://")

    pool = GeventPool(FakeWorker(), 10)
    with pytest.raises(ConfigurationError, match=r"kernel worker -P gevent"):
        pool.start()
