"""Settings: defaults, updates, environment variables and configuration objects."""

from __future__ import annotations

import logging
import os
import types
import uuid
import warnings

import attrs
import pytest

from kernel.app import App
from kernel.config import Settings
from kernel.exceptions import ConfigurationError


@pytest.fixture(autouse=True)
def no_kernel_environment(monkeypatch):
    """Settings read ``KERNEL_*`` variables; keep the caller's out of these tests."""
    for name in list(os.environ):
        if name.startswith("KERNEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def config_module(tmp_path, monkeypatch):
    """Write a module into a directory on sys.path; returns its (unique) name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"kernel_test_config_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(source)
        return name

    return write


# ----------------------------------------------------------------------- defaults


def test_defaults_use_the_embedded_sqlite_broker_and_backend():
    conf = Settings()
    assert conf.broker_url == "sqlite:///kernel.sqlite3"
    assert conf.result_backend == "sqlite:///kernel.sqlite3"


def test_defaults_keep_celery_values_where_meaning_matches():
    conf = Settings()
    assert conf.task_default_queue == "celery"
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.result_expires == 86400.0
    assert conf.worker_prefetch_multiplier == 4
    assert conf.timezone == "UTC"


def test_defaults_favour_at_least_once_delivery():
    conf = Settings()
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.task_max_deliveries == 3
    assert conf.task_dead_letter_queue == "kernel.dead_letter"


def test_mutable_defaults_are_not_shared_between_settings():
    first, second = Settings(), Settings()
    first.accept_content.append("pickle")
    first.imports.append("proj.tasks")
    assert second.accept_content == ["json"]
    assert second.imports == []


def test_every_setting_has_a_reference_entry():
    for field in attrs.fields(Settings):
        assert field.metadata.get("doc"), f"setting {field.name} has no doc"


# ----------------------------------------------------------------------- update


def test_update_sets_values_from_a_mapping_and_keywords():
    conf = Settings()
    conf.update({"task_default_queue": "work"}, result_expires=60)
    assert conf.task_default_queue == "work"
    assert conf.result_expires == 60


def test_update_with_unknown_setting_warns_with_the_closest_name():
    conf = Settings()
    with pytest.warns(UserWarning, match="'broker_ulr'.*did you mean 'broker_url'"):
        conf.update(broker_ulr="memory://")
    assert not hasattr(conf, "broker_ulr")
    assert conf.broker_url == "sqlite:///kernel.sqlite3"


def test_update_with_unknown_setting_without_close_name_points_to_the_reference():
    with pytest.warns(UserWarning, match="'zzz' ignored; see docs/configuration.md"):
        Settings().update(zzz=1)


def test_app_keyword_settings_are_applied():
    app = App(broker="memory://", backend=None, task_default_queue="q1", worker_pool="solo")
    assert app.conf.task_default_queue == "q1"
    assert app.conf.worker_pool == "solo"
    assert app.conf.result_backend is None


def test_app_with_unknown_keyword_setting_warns():
    with pytest.warns(UserWarning, match="did you mean 'task_default_queue'"):
        App(broker="memory://", task_default_queu="q1")


# ----------------------------------------------------------------------- environment


def test_environment_variables_set_string_settings_verbatim():
    conf = Settings()
    conf.from_environ({"KERNEL_BROKER_URL": "memory://", "KERNEL_TASK_DEFAULT_QUEUE": "123"})
    assert conf.broker_url == "memory://"
    assert conf.task_default_queue == "123"  # a string setting stays a string


def test_environment_variables_parse_json_values():
    conf = Settings()
    conf.from_environ(
        {
            "KERNEL_WORKER_CONCURRENCY": "4",
            "KERNEL_RESULT_EXPIRES": "3600.5",
            "KERNEL_TASK_ALWAYS_EAGER": "true",
            "KERNEL_ACCEPT_CONTENT": '["json", "pickle"]',
            "KERNEL_TASK_ROUTES": '{"proj.video.*": {"queue": "video"}}',
            "KERNEL_BROKER_TRANSPORT_OPTIONS": '{"visibility_timeout": 30}',
        }
    )
    assert conf.worker_concurrency == 4
    assert conf.result_expires == 3600.5
    assert conf.task_always_eager is True
    assert conf.accept_content == ["json", "pickle"]
    assert conf.task_routes == {"proj.video.*": {"queue": "video"}}
    assert conf.broker_transport_options == {"visibility_timeout": 30}


def test_environment_value_that_is_not_json_stays_a_string():
    conf = Settings()
    conf.from_environ({"KERNEL_TASK_COMPRESSION": "zlib", "KERNEL_TASK_DEFAULT_EXCHANGE": "tasks"})
    assert conf.task_compression == "zlib"
    assert conf.task_default_exchange == "tasks"


def test_app_reads_environment_variables(monkeypatch):
    monkeypatch.setenv("KERNEL_TASK_DEFAULT_QUEUE", "from-env")
    monkeypatch.setenv("KERNEL_WORKER_PREFETCH_MULTIPLIER", "1")
    app = App(broker="memory://")
    assert app.conf.task_default_queue == "from-env"
    assert app.conf.worker_prefetch_multiplier == 1


def test_app_arguments_win_over_environment_variables(monkeypatch):
    monkeypatch.setenv("KERNEL_BROKER_URL", "sqlite:///env.db")
    monkeypatch.setenv("KERNEL_TASK_DEFAULT_QUEUE", "from-env")
    app = App(broker="memory://", task_default_queue="from-app")
    assert app.conf.broker_url == "memory://"
    assert app.conf.task_default_queue == "from-app"


# ----------------------------------------------------------------------- config_from_object


def test_config_from_module_object(config_module):
    import importlib

    module = importlib.import_module(
        config_module("broker_url = 'memory://'\nresult_expires = 120\n_private = 'ignored'\n")
    )
    conf = Settings()
    conf.config_from_object(module)
    assert conf.broker_url == "memory://"
    assert conf.result_expires == 120


def test_config_from_dotted_module_name(config_module):
    name = config_module("task_default_queue = 'from-module'\nworker_concurrency = 3\n")
    conf = Settings()
    conf.config_from_object(name)
    assert conf.task_default_queue == "from-module"
    assert conf.worker_concurrency == 3


def test_config_from_unimportable_module_name_raises_configuration_error():
    with pytest.raises(ConfigurationError, match="no_such_config_module"):
        Settings().config_from_object("no_such_config_module")


def test_config_from_dict():
    conf = Settings()
    conf.config_from_object({"broker_url": "memory://", "task_acks_late": False})
    assert conf.broker_url == "memory://"
    assert conf.task_acks_late is False


def test_config_from_class_and_instance():
    class Config:
        broker_url = "memory://"
        task_default_queue = "from-class"

    for source in (Config, Config()):
        conf = Settings()
        conf.config_from_object(source)
        assert conf.broker_url == "memory://"
        assert conf.task_default_queue == "from-class"


def test_config_from_object_keeps_a_router_function_for_task_routes(config_module):
    name = config_module(
        "def route(name, args, kwargs, options):\n    return {'queue': 'routed'}\n"
        "task_routes = route\n"
    )
    conf = Settings()
    conf.config_from_object(name)
    assert conf.task_routes("x", (), {}, {}) == {"queue": "routed"}


def test_config_module_imports_are_not_read_as_settings(config_module):
    """Celery config modules import helpers (``Queue``, ``timedelta``); no warnings."""
    name = config_module(
        "from __future__ import annotations\n"
        "import os\n"
        "from datetime import timedelta\n"
        "from os.path import join\n"
        "from kombu import Queue\n"
        "result_expires = 60\n"
    )
    conf = Settings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conf.config_from_object(name)
    assert conf.result_expires == 60


def test_app_config_source_is_applied():
    app = App(broker="memory://", config_source={"task_default_queue": "from-source"})
    assert app.conf.task_default_queue == "from-source"


def test_uppercase_celery_setting_is_rejected_with_the_lowercase_hint(caplog):
    caplog.set_level(logging.WARNING, logger="kernel.config")
    conf = Settings()
    conf.config_from_object({"CELERY_BROKER_URL": "memory://", "CELERY_TASK_ROUTES": {}})

    assert conf.broker_url == "sqlite:///kernel.sqlite3"
    messages = [r.getMessage() for r in caplog.records]
    assert any("CELERY_BROKER_URL" in m and "'broker_url'" in m for m in messages), messages
    assert any("CELERY_TASK_ROUTES" in m and "'task_routes'" in m for m in messages), messages


def test_uppercase_setting_in_a_module_is_rejected(config_module, caplog):
    caplog.set_level(logging.WARNING, logger="kernel.config")
    name = config_module("BROKER_URL = 'memory://'\n")
    conf = Settings()
    conf.config_from_object(name)
    assert conf.broker_url == "sqlite:///kernel.sqlite3"
    assert any("'broker_url'" in r.getMessage() for r in caplog.records)


def test_config_from_object_accepts_a_module_type_instance():
    module = types.ModuleType("generated_config")
    module.task_serializer = "pickle"
    conf = Settings()
    conf.config_from_object(module)
    assert conf.task_serializer == "pickle"


def test_result_expires_accepts_a_timedelta_as_celery_configs_do():
    from datetime import timedelta

    settings = Settings()
    settings.update(result_expires=timedelta(hours=2))
    assert settings.result_expires == 7200.0


def test_result_expires_rejects_other_types_with_a_clear_error():
    from kernel.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="result_expires must be seconds or a timedelta"):
        Settings().update(result_expires="two hours")


def test_misspelled_setting_in_a_dict_warns_even_when_its_value_is_a_function():
    with pytest.warns(UserWarning, match="did you mean 'task_routes'"):
        Settings().config_from_object({"task_route": lambda *a: None})


def test_optional_setting_can_be_unset_from_the_environment():
    settings = Settings()
    settings.from_environ({"KERNEL_RESULT_BACKEND": "none"})
    assert settings.result_backend is None
    settings.from_environ({"KERNEL_BROKER_URL": "none"})  # not optional: kept as text
    assert settings.broker_url == "none"
