# The two quick-start commands, and the checks CI runs. Each target installs what it needs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint install

install:
	$(PIP) -e .

demo: install
	$(PYTHON) -m rpycsvc.cli demo

test:
	$(PIP) -e '.[test]'
	$(PYTHON) -m pytest

lint:
	$(PIP) -e '.[dev]'
	$(PYTHON) -m ruff check rpycsvc tests examples
	$(PYTHON) -m mypy
