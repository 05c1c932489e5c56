"""gevent execution pool for kernel (``kernel worker -P gevent``)."""
