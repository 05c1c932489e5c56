"""The `kernel` command line, run in process against a SQLite broker in tmp_path."""

from __future__ import annotations

import sys
import textwrap
import uuid

import click
import pytest

from kernel import App
from kernel.cli.appload import find_app
from kernel.cli.main import main, scan_plugin_options
from kernel.plugins import manager as manager_module
from kernel.testing.pytest_plugin import start_worker, stop_worker


@pytest.fixture(autouse=True)
def _restore_default_plugin_manager():
    """`main()` installs a process-wide plugin manager; put the old one back."""
    saved = manager_module._default
    yield
    manager_module.set_default_manager(saved)


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/cli.sqlite3"


def run(capsys, *args, input_text=None, monkeypatch=None):
    """Run `kernel ARGS`; return (exit code, stdout, stderr)."""
    if input_text is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(input_text))
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def worker_app(url, kernel_plugins):
    app = App("cli", broker=url, backend=url, plugins=kernel_plugins)

    @app.task(name="cli.add")
    def add(x, y):
        return x + y

    @app.task(name="cli.fail")
    def fail():
        raise KeyError("missing")

    worker, thread = start_worker(app, pool="threads", concurrency=2)
    yield app
    stop_worker(worker, thread)
    app.close()


def test_call_wait_prints_the_result(capsys, url, worker_app):
    code, out, _ = run(
        capsys,
        "-b",
        url,
        "--result-backend",
        url,
        "call",
        "cli.add",
        "--args",
        "[2, 3]",
        "--wait",
        "--timeout",
        "20",
    )
    assert code == 0
    assert out.strip() == "5"


def test_call_prints_the_id_and_result_reads_the_state(capsys, url, worker_app):
    code, out, _ = run(
        capsys,
        "-b",
        url,
        "--result-backend",
        url,
        "call",
        "cli.add",
        "--kwargs",
        '{"x": 1, "y": 2}',
    )
    task_id = out.strip()
    assert code == 0 and uuid.UUID(task_id)
    code, out, _ = run(
        capsys, "-b", url, "--result-backend", url, "result", task_id, "--wait", "--timeout", "20"
    )
    assert code == 0
    assert out.strip() == "SUCCESS: 3"


def test_call_wait_reports_a_failure_with_exit_code_1(capsys, url, worker_app):
    code, _, err = run(
        capsys, "-b", url, "--result-backend", url, "call", "cli.fail", "--wait", "--timeout", "20"
    )
    assert code == 1
    assert "FAILURE" in err and "KeyError" in err


def test_result_of_an_unknown_id_is_pending(capsys, url):
    code, out, _ = run(capsys, "-b", url, "--result-backend", url, "result", "no-such-id")
    assert code == 0 and out.strip() == "PENDING"


@pytest.mark.parametrize("args_json", ["{not json", '{"a": 1}'])
def test_call_rejects_args_that_are_not_a_json_list(capsys, url, args_json):
    code, _, err = run(capsys, "-b", url, "call", "cli.add", "--args", args_json)
    assert code == 2
    assert "--args" in err


def test_purge_asks_for_confirmation_and_force_skips_it(capsys, url, monkeypatch, kernel_plugins):
    app = App("purger", broker=url, backend=url, plugins=kernel_plugins)
    for _ in range(3):
        app.send_task("cli.add", (1, 1))
    code, _, _ = run(capsys, "-b", url, "purge", input_text="n\n", monkeypatch=monkeypatch)
    assert code == 1  # aborted
    code, out, _ = run(capsys, "-b", url, "purge", "-f")
    assert code == 0
    assert "purged 3 message(s) from celery" in out
    app.close()


def test_plugins_lists_builtins_capabilities_and_load_errors(capsys):
    code, out, _ = run(capsys, "--plugin", "no_such_plugin_module", "plugins")
    assert code == 0
    assert "builtin.transports  (builtin)" in out
    assert "transport:sqlite" in out and "pool:prefork" in out
    assert "load errors:" in out
    assert "plugin 'no_such_plugin_module'" in out


def test_report_shows_versions_and_hides_passwords(capsys):
    code, out, _ = run(capsys, "-b", "amqp://guest:secret@localhost//", "report")
    assert code == 0
    assert "kombu" in out and "amqp://guest:***@localhost//" in out
    assert "secret" not in out


def test_unknown_broker_scheme_names_the_extra_to_install(capsys):
    # The dev environment installs the Redis plugin; block it to see what users without it see.
    code, _, err = run(
        capsys, "--no-plugin", "redis", "-b", "redis://localhost:6379/0", "call", "x.y"
    )
    assert code == 1
    assert 'pip install "taskkernel[redis]"' in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["worker", "call", "result", "purge", "plugins", "report"])
def test_every_command_offers_plugin_options(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert "--plugin" in out and "--no-plugin" in out


def test_plugin_options_are_found_anywhere_on_the_line():
    plugins, blocked = scan_plugin_options(
        ["--plugin", "a", "worker", "--plugin=b,c", "--no-plugin", "hello", "--", "--plugin", "z"]
    )
    assert plugins == ["a", "b", "c"]
    assert blocked == ["hello"]


# --------------------------------------------------------------------------- -A lookups


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A directory on sys.path with uniquely named modules, cleaned up afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"proj_{uuid.uuid4().hex[:8]}"
    before = set(sys.modules)
    yield tmp_path, name
    for module in set(sys.modules) - before:
        sys.modules.pop(module, None)


def write(path, text):
    path.write_text(textwrap.dedent(text))


def test_find_app_in_a_module_attribute_named_app(project):
    root, name = project
    write(root / f"{name}.py", "from kernel import App\napp = App('x')\n")
    assert find_app(name).main == "x"


def test_find_app_by_module_and_attribute(project):
    root, name = project
    write(root / f"{name}.py", "from kernel import App\nmine = App('y')\nother = App('z')\n")
    assert find_app(f"{name}:mine").main == "y"


def test_find_app_in_a_package_celery_module(project):
    root, name = project
    (root / name).mkdir()
    write(root / name / "__init__.py", "")
    write(root / name / "celery.py", "from kernel import App\napp = App('pkg')\n")
    assert find_app(name).main == "pkg"


def test_find_app_by_dotted_attribute(project):
    root, name = project
    write(root / f"{name}.py", "from kernel import App\nqueue_app = App('dotted')\n")
    assert find_app(f"{name}.queue_app").main == "dotted"


def test_find_app_explains_what_is_missing(project):
    root, name = project
    write(root / f"{name}.py", "VALUE = 1\n")
    with pytest.raises(click.UsageError, match="holds no App"):
        find_app(name)
    with pytest.raises(click.UsageError, match="no module or attribute"):
        find_app("surely_not_a_module_xyz")


def test_call_with_arguments_that_do_not_fit_is_a_usage_error(
    capsys, url, monkeypatch, tmp_path, project
):
    root, name = project
    write(
        root / f"{name}.py",
        f"from kernel import App\napp = App('x', broker={url!r})\n"
        "@app.task(name='x.add')\ndef add(a, b):\n    return a + b\n",
    )
    code, _, err = run(capsys, "-A", name, "call", "x.add", "--args", "[1]")
    assert code == 2
    assert "missing a required argument: 'b'" in err and "Traceback" not in err


def test_plugins_lists_the_commands_a_plugin_adds(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert "command:hello" in out
