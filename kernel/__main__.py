"""``python -m kernel`` is the ``kernel`` command."""

from kernel.cli.main import main

if __name__ == "__main__":
    main()
