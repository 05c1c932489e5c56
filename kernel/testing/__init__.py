"""Test helpers for kernel users and plugin authors (documented plugin API)."""
