"""The example plugin is found through its entry point and its hooks run."""

import logging

from kernel.cli.main import main
from kernel.plugins.manager import PluginManager


def test_example_plugin_is_discovered_through_its_entry_point():
    manager = PluginManager().load()
    infos = {info.name: info for info in manager.describe()}
    assert "hello" in infos
    assert infos["hello"].distribution == "taskkernel-example-hello"
    assert "kernel_task_success" in infos["hello"].hooks


def test_hello_command_is_added_to_the_cli(capsys):
    try:
        main(["hello", "--name", "tester"])
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    assert "hello, tester!" in capsys.readouterr().out


def test_hello_command_disappears_with_no_plugin(capsys):
    try:
        main(["--no-plugin", "hello", "hello"])
    except SystemExit as exit_:
        assert exit_.code == 2
    assert "No such command 'hello'" in capsys.readouterr().err


def test_task_success_hook_logs_a_greeting(kernel_app, caplog):
    @kernel_app.task
    def double(x):
        return 2 * x

    with caplog.at_level(logging.INFO, logger="kernel_example_hello.plugin"):
        assert double.apply((21,)).get() == 42
    assert any("hello plugin:" in r.getMessage() for r in caplog.records)
