"""The worker: consumer loop, pools, and task execution."""
