# The two quick-start commands, and the checks CI runs. Each target installs what it needs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test matrix lint install

install:
	$(PIP) -e .

demo: install
	$(PYTHON) -m rpycsvc.cli demo

test:
	$(PIP) -e '.[test]'
	$(PYTHON) -m pytest

# The suite on every supported CPython (3.9 to 3.13), a venv each (noxfile.py). Found on PATH
# or under pyenv; a missing one fails unless RPYCSVC_ALLOW_MISSING_PYTHONS=1.
# NOX="-s tests-3.9" picks sessions.
matrix:
	$(PIP) 'nox>=2024.10.9'
	$(PYTHON) -m nox $(NOX)

lint:
	$(PIP) -e '.[dev]'
	$(PYTHON) -m ruff check rpycsvc tests examples
	$(PYTHON) -m mypy
