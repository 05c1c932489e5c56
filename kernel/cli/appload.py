"""Finding the user's app from ``-A``: ``proj``, ``proj.tasks``, ``proj:app``, ``proj.app``."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from kernel.app import App

ATTRIBUTE_NAMES = ("app", "celery", "kernel")


def _import(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise


def _app_in(obj: Any) -> App | None:
    if isinstance(obj, App):
        return obj
    for name in ATTRIBUTE_NAMES:
        candidate = getattr(obj, name, None)
        if isinstance(candidate, App):
            return candidate
    apps = [v for v in vars(obj).values() if isinstance(v, App)] if hasattr(obj, "__dict__") else []
    return apps[0] if len(apps) == 1 else None


def find_app(spec: str) -> App:
    """Resolve ``-A``; raise click.UsageError saying what was tried."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attribute = spec.partition(":")
    if attribute:
        module = _import(module_name)
        if module is None:
            raise click.UsageError(f"-A {spec}: cannot import module {module_name!r}")
        obj: Any = module
        for part in attribute.split("."):
            obj = getattr(obj, part, None)
        found = _app_in(obj) if obj is not None else None
        if found is None:
            raise click.UsageError(f"-A {spec}: {attribute!r} in {module_name} is not an App")
        return found
    module = _import(spec)
    if module is not None:
        found = _app_in(module)
        if found is not None:
            return found
        # a package whose app lives in proj.celery / proj.app, Celery-style
        for name in ATTRIBUTE_NAMES:
            sub = _import(f"{spec}.{name}")
            if sub is not None and (found := _app_in(sub)) is not None:
                return found
        raise click.UsageError(
            f"-A {spec}: module found but it holds no App; name it 'app' or use -A {spec}:name"
        )
    parent, _, attribute = spec.rpartition(".")
    if parent and (module := _import(parent)) is not None:
        found = _app_in(getattr(module, attribute, None))
        if found is not None:
            return found
    raise click.UsageError(
        f"-A {spec}: no module or attribute of that name (run from the directory that "
        "contains your project, or check the spelling)"
    )
