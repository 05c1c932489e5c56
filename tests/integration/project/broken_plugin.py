"""A plugin that fails to import, to show the worker keeps going without it."""

raise ImportError("this plugin is broken on purpose (integration test)")
