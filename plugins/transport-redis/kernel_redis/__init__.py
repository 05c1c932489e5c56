"""kernel's Redis plugin: a broker transport and a result backend on Redis."""
