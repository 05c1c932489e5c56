"""The ``kernel`` command line (click)."""
