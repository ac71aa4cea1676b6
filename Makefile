# Two commands: `make run` (everything, with a demo instance) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint soak clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Berth needs Python 3.11 or newer; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

run: setup
	$(PY) -m berth.run

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

# Not part of `make test`: 1,000 provision/delete cycles with crashes (about 20-30 minutes).
soak: setup
	$(PY) -m bench.soak --cycles $(or $(CYCLES),1000)

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache tests/artifacts
