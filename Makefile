# The two quick-start commands (`make demo`, `make test`), and the checks CI runs.
#
# Everything runs in a virtual environment of its own, .venv/ beside this file, made on first
# use from $(PYTHON) (python3 unless told otherwise): a distribution's python3 refuses
# `pip install` outside one (PEP 668, "externally-managed-environment"). Each target installs
# what it needs into it; `make clean` removes it.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test matrix lint install clean

# A virtualenv needs Python >= 3.9 with its venv module (and ensurepip, which Debian and Ubuntu
# ship apart as python3-venv): say which is missing rather than fail half-way.
$(VPY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null || { \
	  echo "rpycsvc needs Python >= 3.9: '$(PYTHON)' is $$($(PYTHON) -V 2>&1 || echo missing)." >&2; \
	  echo "Run make with PYTHON=/path/to/python3.X." >&2; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "'$(PYTHON)' has no working venv module, needed to make $(VENV)/." >&2; \
	  echo "On Debian or Ubuntu: sudo apt install python3-venv (then run make again)." >&2; \
	  exit 1; }
	@echo "making a virtual environment for rpycsvc in $(VENV)/ (with $$($(PYTHON) -V))"
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

install: $(VPY)
	$(PIP) -e .

demo: install
	$(VPY) -m rpycsvc.cli demo

test: $(VPY)
	$(PIP) -e '.[test]'
	$(VPY) -m pytest

# The suite on every supported CPython (3.9 to 3.13), a venv each (noxfile.py). Found on PATH
# or under pyenv; a missing one fails unless RPYCSVC_ALLOW_MISSING_PYTHONS=1.
# NOX="-s tests-3.9" picks sessions.
matrix: $(VPY)
	$(PIP) 'nox>=2024.10.9'
	$(VPY) -m nox $(NOX)

lint: $(VPY)
	$(PIP) -e '.[dev]'
	$(VPY) -m ruff check rpycsvc tests examples tools
	$(VPY) -m mypy

clean:
	rm -rf $(VENV) .nox
