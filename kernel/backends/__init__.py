"""Result backends: the base class plugins implement, and the builtin ones."""
