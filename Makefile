# The two commands of the README: `make demo` and `make test`. Both install what is missing.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint demo bench stress clean

setup:
	@scripts/bootstrap

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

demo: setup
	$(PY) -m demo

# Bounded stress/soak runs (tests marked slow, left out of `make test`); see docs/reliability.md.
stress: setup
	$(PY) -m pytest -q -s -m slow tests/stress

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
