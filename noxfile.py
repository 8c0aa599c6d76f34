"""The test suite on every CPython rpycsvc supports: ``nox`` runs them all, ``nox -s tests-3.9``
one (``nox -l`` lists them; arguments after ``--`` go to pytest).

Each session gets its own virtualenv under ``.nox/`` with ``pip install -e '.[test]'``.
Interpreters are looked for as ``python3.X`` on PATH, then under pyenv
(``$PYENV_ROOT/versions/3.X.*``, newest patch first); one that is on PATH but doesn't run
(a pyenv shim for a version that isn't selected) doesn't count. A supported version that can't
be found is an error, so a run can't pass by skipping it; on a machine that lacks some, set
``RPYCSVC_ALLOW_MISSING_PYTHONS=1`` to skip those sessions instead (nox says which).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import nox

#: Every CPython rpycsvc supports (pyproject.toml: requires-python and the classifiers).
SUPPORTED = ("3.9", "3.10", "3.11", "3.12", "3.13")


def _runs_as(exe: str, version: str) -> bool:
    """True if ``exe`` starts and is CPython ``version``."""
    try:
        out = subprocess.run(
            [exe, "-c", "import sys, platform; print(platform.python_implementation(), "
             "'%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.split() == ["CPython", version]


def _patch(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def find_python(version: str) -> str | None:
    """``python3.X`` from PATH if it runs, else the newest pyenv install of that version."""
    on_path = shutil.which(f"python{version}")
    if on_path and _runs_as(on_path, version):
        return on_path
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    installs = [p for p in pyenv.glob(f"{version}.*") if re.fullmatch(r"[\d.]+", p.name)]
    for install in sorted(installs, key=_patch, reverse=True):
        exe = install / "bin" / f"python{version}"
        if _runs_as(str(exe), version):
            return str(exe)
    return None


def _expose(found: dict[str, str]) -> None:
    """Make nox find each interpreter by its version: links named ``python3.X``, in a
    directory of this run's own (parallel runs can't disturb it), first on our PATH."""
    links = Path(tempfile.mkdtemp(prefix="rpycsvc-nox-pythons-"))
    atexit.register(shutil.rmtree, links, ignore_errors=True)
    for version, exe in found.items():
        (links / f"python{version}").symlink_to(exe)
    os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"


FOUND = {v: os.path.realpath(exe) for v in SUPPORTED if (exe := find_python(v))}
_expose(FOUND)

nox.options.error_on_missing_interpreters = os.environ.get("RPYCSVC_ALLOW_MISSING_PYTHONS") != "1"
if hasattr(nox.options, "download_python"):
    nox.options.download_python = "never"  # never fetch an interpreter: test the machine's


@nox.session(python=list(SUPPORTED))
def tests(session: nox.Session) -> None:
    """The whole suite (``python -m pytest``), as ``make test`` runs it."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)
