# The two commands of the README: `make demo` and `make test`. Both install what is missing.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint demo bench clean

setup:
	@scripts/bootstrap

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

demo: setup
	$(PY) -m demo

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
