"""The plugin manager: loading order, failures, conflicts, lookups and listing."""

from __future__ import annotations

import logging
import textwrap
import uuid

import pytest

from kernel import hookimpl
from kernel.app import App
from kernel.exceptions import PluginError, UnknownBackend, UnknownPool, UnknownTransport
from kernel.plugins import loader
from kernel.plugins.manager import BUILTIN_PLUGINS, PluginManager
from kernel.plugins.specs import TransportSpec

NO_AUTOLOAD = {"KERNEL_PLUGIN_AUTOLOAD": "0"}
MEMORY_TRANSPORT = "kombu.transport.memory:Transport"


def transport_plugin(name: str, scheme: str):
    """A plugin object providing one transport."""

    class Plugin:
        @hookimpl
        def kernel_transports(self):
            return [TransportSpec(name=name, schemes=[scheme], kombu_transport=MEMORY_TRANSPORT)]

    return Plugin()


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """Write ``<unique package>.plugin`` with ``source``; returns its dotted path."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        package = f"kernel_test_plugin_{uuid.uuid4().hex[:8]}"
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "plugin.py").write_text(textwrap.dedent(source))
        return f"{package}.plugin"

    return write


GOOD_PLUGIN = """
    from kernel import hookimpl
    from kernel.plugins.specs import TransportSpec

    @hookimpl
    def kernel_transports():
        return [TransportSpec(name="good", schemes=["good"],
                              kombu_transport="kombu.transport.memory:Transport")]
"""


# ----------------------------------------------------------------------- builtins


def test_builtins_are_registered_as_builtin_dot_module():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    names = [info.name for info in manager.describe()]
    expected = [f"builtin.{path.rsplit('.', 1)[-1]}" for path in BUILTIN_PLUGINS]
    assert names[: len(expected)] == expected
    assert manager.failures == []


def test_builtins_provide_the_embedded_capabilities():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    assert manager.transport_for_url("sqlite:///x.db").name == "sqlite"
    assert manager.transport_for_url("memory://").name == "memory"
    assert manager.backend_for_url("cache+memory://").name == "memory"
    assert manager.backend_for_url("sqlite:///x.db").name == "sqlite"
    assert {s.name for s in manager.serializers()} >= {"json", "pickle"}
    assert {manager.pool(n).name for n in ("solo", "threads", "prefork")} == {
        "solo",
        "threads",
        "prefork",
    }


def test_describe_lists_origin_hooks_and_capabilities(plugin_package):
    path = plugin_package(GOOD_PLUGIN)
    manager = PluginManager().load(plugins=[path], environ=NO_AUTOLOAD)
    infos = {info.name: info for info in manager.describe()}

    transports = infos["builtin.transports"]
    assert transports.builtin is True
    assert transports.distribution == "taskkernel"
    assert transports.hooks == ("kernel_transports",)
    assert transports.capabilities == ("transport:sqlite", "transport:memory")

    module_plugin = infos[path]
    assert module_plugin.builtin is False
    assert module_plugin.distribution is None
    assert module_plugin.capabilities == ("transport:good",)


# ----------------------------------------------------------------------- conflicts


def test_two_plugins_claiming_one_scheme_keep_the_first_and_report_one_failure():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    manager.register(transport_plugin("first-mq", "mq"), "first")
    manager.register(transport_plugin("second-mq", "mq"), "second")

    assert manager.transport_for_url("mq://host").name == "first-mq"
    assert len(manager.failures) == 1
    failure = manager.failures[0]
    assert failure.name == "second"
    assert "'first'" in failure.error
    assert "mq" in failure.error


def test_plugin_claiming_a_builtin_scheme_does_not_replace_the_builtin():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    manager.register(transport_plugin("impostor", "sqlite"), "impostor")

    assert manager.transport_for_url("sqlite:///x.db").name == "sqlite"
    assert [f.name for f in manager.failures] == ["impostor"]
    assert "builtin.transports" in manager.failures[0].error


def test_conflict_is_reported_once_even_after_more_plugins_register():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    manager.register(transport_plugin("first-mq", "mq"), "first")
    manager.register(transport_plugin("second-mq", "mq"), "second")
    manager.transport_for_url("mq://")
    manager.register(transport_plugin("other", "other"), "third")
    manager.transport_for_url("mq://")

    assert len(manager.failures) == 1


# ----------------------------------------------------------------------- failures


def test_plugin_that_raises_on_import_is_recorded_and_others_still_work(plugin_package):
    broken = plugin_package("raise RuntimeError('plugin exploded at import')\n")
    good = plugin_package(GOOD_PLUGIN)

    manager = PluginManager().load(plugins=[broken, good], environ=NO_AUTOLOAD)

    assert [f.name for f in manager.failures] == [broken]
    assert "RuntimeError: plugin exploded at import" in manager.failures[0].error
    assert manager.transport_for_url("good://").name == "good"
    assert manager.transport_for_url("memory://").name == "memory"


def test_plugin_whose_capability_hook_raises_is_recorded(plugin_package):
    path = plugin_package("""
        from kernel import hookimpl

        @hookimpl
        def kernel_transports():
            raise ValueError("no transports today")
    """)
    manager = PluginManager().load(plugins=[path], environ=NO_AUTOLOAD)

    assert manager.transport_for_url("memory://").name == "memory"
    assert len(manager.failures) == 1
    assert "kernel_transports" in manager.failures[0].error
    assert "no transports today" in manager.failures[0].error


def test_unknown_plain_plugin_name_gives_a_clear_failure():
    name = f"nosuchplugin{uuid.uuid4().hex[:6]}"
    manager = PluginManager().load(plugins=[name], environ=NO_AUTOLOAD)

    assert [f.name for f in manager.failures] == [name]
    assert "no installed plugin has that name" in manager.failures[0].error
    assert "kernel plugins" in manager.failures[0].error


def test_unimportable_dotted_path_gives_a_failure_naming_it():
    manager = PluginManager().load(plugins=["no_such_pkg_xyz.plugin"], environ=NO_AUTOLOAD)
    assert [f.name for f in manager.failures] == ["no_such_pkg_xyz.plugin"]
    assert "imported" in manager.failures[0].error


def test_failure_describes_plugin_distribution_and_reason():
    failure = loader.LoadFailure("redis", "taskkernel-transport-redis", "1.0", "boom")
    assert failure.describe() == (
        "plugin 'redis' (taskkernel-transport-redis 1.0) failed to load: boom"
    )


# ----------------------------------------------------------------------- loading


def test_plugin_given_as_dotted_module_path_is_registered(plugin_package):
    path = plugin_package(GOOD_PLUGIN)
    manager = PluginManager().load(plugins=[path], environ=NO_AUTOLOAD)
    assert manager.pm.has_plugin(path)
    assert manager.transport_for_url("good://").name == "good"


def test_kernel_plugins_environment_variable_loads_plugins(plugin_package):
    first, second = plugin_package(GOOD_PLUGIN), plugin_package("")
    manager = PluginManager().load(
        environ={**NO_AUTOLOAD, "KERNEL_PLUGINS": f" {first} , {second} "}
    )
    assert manager.pm.has_plugin(first)
    assert manager.pm.has_plugin(second)
    assert manager.failures == []


def test_autoload_zero_skips_entry_points():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    assert all(info.builtin for info in manager.describe())


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "OFF"])
def test_autoload_accepts_common_false_spellings(value):
    manager = PluginManager().load(environ={"KERNEL_PLUGIN_AUTOLOAD": value})
    assert all(info.builtin for info in manager.describe())


def test_autoload_loads_every_advertised_entry_point():
    advertised = loader.entry_point_names()
    if not advertised:
        pytest.skip("no plugin advertises a kernel.plugins entry point here")
    manager = PluginManager().load(environ={})
    loaded = {info.name for info in manager.describe()}
    failed = {failure.name for failure in manager.failures}
    assert advertised <= loaded | failed


def test_entry_point_plugin_can_be_named_when_autoload_is_off():
    advertised = sorted(loader.entry_point_names())
    if not advertised:
        pytest.skip("no plugin advertises a kernel.plugins entry point here")
    manager = PluginManager().load(plugins=[advertised[0]], environ=NO_AUTOLOAD)
    assert manager.pm.has_plugin(advertised[0])
    assert {i.name for i in manager.describe() if not i.builtin} == {advertised[0]}


def test_blocked_plugin_is_not_registered():
    manager = PluginManager().load(blocked=["builtin.pools"], environ=NO_AUTOLOAD)

    assert "builtin.pools" not in {info.name for info in manager.describe()}
    with pytest.raises(UnknownPool):
        manager.pool("solo")


def test_block_after_loading_removes_the_plugin_capabilities():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    assert manager.transport_for_url("memory://").name == "memory"

    manager.block("builtin.transports")

    with pytest.raises(UnknownTransport):
        manager.transport_for_url("memory://")
    assert manager.register(transport_plugin("again", "again"), "builtin.transports") is False


def test_blocked_dotted_path_plugin_is_not_imported(plugin_package):
    broken = plugin_package("raise RuntimeError('must not be imported')\n")
    manager = PluginManager().load(plugins=[broken], blocked=[broken], environ=NO_AUTOLOAD)
    assert manager.failures == []
    assert not manager.pm.has_plugin(broken)


def test_builtin_that_fails_to_load_is_an_error(monkeypatch):
    monkeypatch.setattr(
        "kernel.plugins.manager.BUILTIN_PLUGINS", ("kernel.plugins.builtin.no_such_builtin",)
    )
    with pytest.raises(PluginError, match="no_such_builtin"):
        PluginManager().load(environ=NO_AUTOLOAD)


# ----------------------------------------------------------------------- lookups


def test_unknown_redis_scheme_names_the_extra_to_install():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    with pytest.raises(UnknownTransport) as raised:
        manager.transport_for_url("redis://localhost:6379/0")
    message = str(raised.value)
    assert "redis://localhost:6379/0" in message
    assert 'pip install "taskkernel[redis]"' in message


def test_unknown_scheme_hides_the_password_in_the_error():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    with pytest.raises(UnknownTransport) as raised:
        manager.transport_for_url("amqp://guest:s3cret@rabbit//")
    assert "s3cret" not in str(raised.value)
    assert 'pip install "taskkernel[amqp]"' in str(raised.value)


def test_unknown_backend_scheme_without_extra_points_to_kernel_plugins():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    with pytest.raises(UnknownBackend, match="kernel plugins"):
        manager.backend_for_url("mongodb://db/results")


def test_unknown_pool_lists_the_choices():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    with pytest.raises(UnknownPool) as raised:
        manager.pool("eventlet")
    assert "'eventlet'" in str(raised.value)
    assert "prefork, solo, threads" in str(raised.value)


def test_gevent_pool_names_the_extra_to_install():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    with pytest.raises(UnknownPool, match=r'pip install "taskkernel\[gevent\]"'):
        manager.pool("gevent")


def test_app_with_unknown_broker_scheme_fails_when_connecting():
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    app = App(broker="redis://localhost", backend=None, plugins=manager)
    with pytest.raises(UnknownTransport, match="taskkernel\\[redis\\]"):
        app.connection()


# ----------------------------------------------------------------------- tracing


def test_trace_environment_variable_logs_hook_calls(monkeypatch, caplog):
    monkeypatch.setenv("KERNEL_TRACE_PLUGINS", "1")
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    caplog.set_level(logging.DEBUG, logger="kernel.plugins.trace")

    App(broker="memory://", backend=None, plugins=manager).finalize()

    messages = [r.getMessage() for r in caplog.records if r.name == "kernel.plugins.trace"]
    assert "hook kernel_configure(app)" in messages
    assert "hook kernel_configure done" in messages


def test_hook_calls_are_not_logged_without_tracing(monkeypatch, caplog):
    monkeypatch.delenv("KERNEL_TRACE_PLUGINS", raising=False)
    manager = PluginManager().load(environ=NO_AUTOLOAD)
    caplog.set_level(logging.DEBUG, logger="kernel.plugins.trace")

    App(broker="memory://", backend=None, plugins=manager).finalize()

    assert not [r for r in caplog.records if r.name == "kernel.plugins.trace"]
