"""Builtin capabilities, registered through the same hooks as external plugins."""
