# The two set-up commands (README): `make quickstart` and `make test`.
# Needs only Python 3.10+: uv is bootstrapped into .tools/ when it is not installed.
PYTHON ?= python3
UV ?= $(shell command -v uv 2>/dev/null)
ifeq ($(strip $(UV)),)
UV := .tools/bin/uv
endif
# Use the Python given above; never download one.
export UV_PYTHON_DOWNLOADS := never
UVRUN := $(UV) run --python $(PYTHON)

.PHONY: quickstart test lint docs bootstrap bench

quickstart: $(UV)  ## start a worker on the embedded default, send tasks, show results
	$(UVRUN) python examples/quickstart/run.py

test: $(UV)  ## the whole test suite (service tests skip when their server is absent)
	$(UVRUN) pytest $(PYTEST_ARGS)

lint: $(UV)
	$(UVRUN) ruff check .
	$(UVRUN) ruff format --check .

docs: $(UV)  ## regenerate the configuration reference from the settings class
	$(UVRUN) python -c "from kernel.config import reference_markdown as r; print(r(), end='')" > docs/configuration.md

bench: $(UV)  ## kernel against Celery and Dramatiq on one broker (bench/run.py; BENCH_ARGS="--broker sqlite|amqp ...")
	$(UVRUN) --group bench python bench/run.py $(BENCH_ARGS)

bootstrap: $(UV)

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet --disable-pip-version-check uv
