# The two README commands. Both create .venv (Python 3.10-3.12) and install the project from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
RUN_DIR ?= runs/quickstart

.PHONY: venv install install-test quickstart test test-slow lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(PY)
	$(PIP) install --quiet -e .

install-test: $(PY)
	$(PIP) install --quiet -e '.[test]'

## Set up and run the whole system end to end on the built-in synthetic marketplace.
quickstart: install
	$(VENV)/bin/recsys quickstart --out $(RUN_DIR)

## Set up and run the default test tier (slow and GPU tests are skipped; pytest's "no tests" exit 5 fails).
test: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: no tests were collected"; exit 1; fi; exit $$rc

test-slow: install-test
	$(VENV)/bin/pytest -q -m slow

lint: install-test
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
