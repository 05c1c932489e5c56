"""The quickstart's tasks. With no settings, broker and results share ./kernel.sqlite3."""

import time

from kernel import App

app = App("tasks")


@app.task
def add(x, y):
    return x + y


@app.task
def slow_square(x):
    time.sleep(0.05)
    return x * x


@app.task
def divide(x, y):
    return x / y
