"""The magics in IPython's own shell (no kernel), in a subprocess per test: ``%load_ext
rpycsvc``, ``%rpycsvc``, ``%%remote`` and ``%%broadcast``, their errors, SIGINT (a
terminal's Ctrl-C, what the kernel's interrupt sends) stopping a ``%%remote`` cell blocked
in C, and the session processes stopping with ``%rpycsvc close``."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.servers import REPO, running_server

pytest.importorskip("IPython")

BOUND = 60.0
DRIVER = REPO / "tests" / "support" / "ipython_driver.py"


@pytest.fixture(scope="module")
def servers() -> Iterator[list[str]]:
    with running_server(workers=1) as a, running_server(workers=1) as b:
        yield [a.address, b.address]


@pytest.fixture(autouse=True)
def _own_ipython_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shell gets an IPython directory (profile, history) of its own."""
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))


def shell(cells: list[str]) -> subprocess.Popen[str]:
    """IPython's shell running ``cells``, one ``@@ cell N: ...`` line after each."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-u", str(DRIVER), json.dumps(cells)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, cwd=str(REPO), env=env)


def run_cells(cells: list[str]) -> str:
    proc = shell(cells)
    try:
        out, _ = proc.communicate(timeout=BOUND)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    return out


def status(out: str, n: int) -> str:
    m = re.search(rf"^@@ cell {n}: (.*)$", out, re.M)
    assert m, out
    return m.group(1)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_remote_cells_keep_their_session_and_broadcast_names_each_server(
        servers: list[str]) -> None:
    out = run_cells([
        "%load_ext rpycsvc",
        f"%rpycsvc connect {' '.join(servers)}",
        "%%remote\nimport os\nwords = ['a', 'b']\nprint('first pid', os.getpid())",
        "%%remote 0\nprint('words', words)\nlen(words)",
        f"%%remote {servers[1]}\nimport os\nprint('second pid', os.getpid())",
        "%%broadcast\nimport os\nprint('pid', os.getpid())\nprint('part', end='')",
        "print(type(cluster).__name__, len(cluster))",
    ])
    for n in range(7):
        assert status(out, n) == "ok", out
    first = re.search(r"^first pid (\d+)$", out, re.M)
    second = re.search(r"^second pid (\d+)$", out, re.M)
    assert first and second and first.group(1) != second.group(1), out
    assert "words ['a', 'b']\n2\n" in out  # the session kept it; the last value is shown
    # every server, each line named; the same sessions as %%remote's
    assert f"[{servers[0]}] pid {first.group(1)}\n" in out, out
    assert f"[{servers[1]}] pid {second.group(1)}\n" in out, out
    assert f"[{servers[0]}] part\n" in out  # a last line without newline still shows
    assert "Cluster 2\n" in out


def test_errors_say_what_to_do(servers: list[str]) -> None:
    out = run_cells([
        "%load_ext rpycsvc.integrations.ipython",
        "%rpycsvc",
        "%%remote\nprint(1)",
        "%rpycsvc connect --bogus x",
        f"%rpycsvc connect {servers[0]}",
        "%%remote 5\nprint(1)",
        "%%remote\nprint('before')\n1 / 0",
        "%%broadcast extra\nprint(1)",
    ])
    assert status(out, 1).startswith("error") and "no cluster yet" in out
    assert "run %rpycsvc connect HOST" in out
    assert "unknown option '--bogus'" in out
    assert "no server '5' in the cluster" in out
    assert status(out, 6) == "error RemoteCellError"
    assert "before\n" in out and "ZeroDivisionError: division by zero" in out  # server's
    assert f"RemoteCellError: the cell failed on {servers[0]} (raised)" in out
    assert "ipython.py" not in out  # no traceback of the magic itself
    assert "%%broadcast takes no arguments" in out


def test_service_only_servers_refuse_remote_cells(service_only: object) -> None:
    address = service_only.address  # type: ignore[attr-defined]
    out = run_cells(["%load_ext rpycsvc", f"%rpycsvc connect {address}", "%%remote\nprint(1)"])
    assert status(out, 2).startswith("error")
    assert "service-only mode (--no-classic)" in out


def interrupt_when(proc: subprocess.Popen[str], ready: Callable[[str], bool]) -> str:
    """The shell's whole output: read until ``ready(output)`` (within BOUND), then SIGINT it
    once and read to its end, which must come within 45 s (well before the cells' 60 s
    sleep). The shell is killed in any case."""
    out = ""
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + BOUND
        while not ready(out):
            assert time.monotonic() < deadline and proc.poll() is None, out
            if sel.select(1.0):
                out += proc.stdout.readline()
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=45.0)  # well before the sleep's 60 s
        out += rest
        assert time.monotonic() - started < 45.0
    finally:
        proc.kill()
    return out


def test_sigint_stops_a_remote_cell_blocked_in_sleep_and_the_shell_goes_on(
        servers: list[str]) -> None:
    proc = shell([
        "%load_ext rpycsvc",
        f"%rpycsvc connect {servers[0]}",
        "%%remote\nx = 5",
        "%%remote\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)\n"
        "print('not reached')",
        "%%remote\nprint('x is', x)",
        "print('local', 1 + 1)",
    ])
    out = interrupt_when(proc, lambda out: "sleeping\n" in out)
    assert proc.returncode == 0, out
    assert status(out, 3) == "error KeyboardInterrupt", out
    assert "KeyboardInterrupt" in out and "not reached" not in out
    assert status(out, 4) == "ok" and "x is 5\n" in out  # the session goes on, with x
    assert "local 2\n" in out


def test_sigint_stops_a_broadcast_cell_on_every_server(servers: list[str]) -> None:
    proc = shell([
        "%load_ext rpycsvc",
        f"%rpycsvc connect {' '.join(servers)}",
        "%%broadcast\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)\n"
        "print('not reached')",
        "%%broadcast\nprint('next')",
    ])
    out = interrupt_when(proc, lambda out: out.count("] sleeping\n") >= 2)
    assert status(out, 2) == "error KeyboardInterrupt", out
    assert "not reached" not in out
    for address in servers:
        assert f"[{address}] KeyboardInterrupt" in out, out  # each server's traceback
        assert f"[{address}] next\n" in out
    assert status(out, 3) == "ok"


def test_close_stops_the_sessions_and_forgets_the_cluster(servers: list[str]) -> None:
    out = run_cells([
        "%load_ext rpycsvc",
        f"%rpycsvc connect {servers[0]} --name pool",
        "%%remote\nimport os\nprint('session pid', os.getpid())",
        "%rpycsvc close",
        "print('pool' in dir())",
        "%%remote\nprint(1)",
    ])
    pid = re.search(r"^session pid (\d+)$", out, re.M)
    assert pid, out
    assert status(out, 3) == "ok" and "False\n" in out
    assert status(out, 5).startswith("error") and "no cluster" in out
    deadline = time.monotonic() + 15
    while alive(int(pid.group(1))):
        assert time.monotonic() < deadline, f"session process {pid.group(1)} still runs"
        time.sleep(0.05)


def test_a_session_that_ended_is_started_again_for_the_next_cell(servers: list[str]) -> None:
    out = run_cells([
        "%load_ext rpycsvc",
        f"%rpycsvc connect {servers[0]}",
        "%%remote\nimport os\nkept = 1\nprint('old pid', os.getpid())\nos._exit(3)",
        "%%remote\nimport os\nprint('new pid', os.getpid())\nprint('kept' in dir())",
    ])
    assert status(out, 2) == "error RemoteCellError", out
    assert "the session process ended (exit status 3); its variables are gone" in out
    old, new = re.search(r"^old pid (\d+)$", out, re.M), re.search(r"^new pid (\d+)$", out, re.M)
    assert old and new and old.group(1) != new.group(1), out
    assert status(out, 3) == "ok" and "False\n" in out
