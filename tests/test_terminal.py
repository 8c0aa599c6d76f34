"""Terminal output that behaves: progress bars draw only on terminals and stay below remote
output; ``status`` aligns DOWN rows and merges duplicates; commands piped into ``head``
end quietly; ``--help`` shows defaults and no reST markup.

Client programs run as child processes whose stderr/stdout are a pipe or a pty, as a user's
would be; the servers are real (the module's in-process server, or ``rpycsvc demo``'s own).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shlex
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Callable

import pytest

import rpycsvc
from rpycsvc.cli.status import ServerStatus, format_table, unique_addresses
from rpycsvc.client.output import EXIT_STDOUT_CLOSED
from tests.support.servers import REPO

WAIT = 60.0
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

#: A client program: a map with a bar, where item 1 waits for a gate file and then prints
#: on the server, then a map_reduce with a bar.
CHILD = r'''
import logging, sys, time
from pathlib import Path
import rpycsvc

def work(i, gate):
    if i == 1:
        deadline = time.monotonic() + 60
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        print("REMOTE LINE", flush=True)
        logging.getLogger("job").warning("REMOTE LOG")
    return i * 2

logging.basicConfig(stream=sys.stderr, format="%(server)s %(message)s")
address, gate = sys.argv[1], sys.argv[2]
with rpycsvc.Cluster([address], forward_logging=True) as cluster:
    out = list(cluster.map(work, range(3), [gate] * 3, chunksize=1, progress=True))
    print("RESULT", out, flush=True)
    total = cluster.map_reduce(abs, lambda a, b: a + b, range(-6, 6), chunksize=3,
                               progress=True)
    print("REDUCED", total, flush=True)
'''

ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def screen(raw: str) -> list[str]:
    """What a terminal shows for ``raw``: handles ``\\r``, ``\\n`` and erase-to-end-of-line
    (the only controls the bar uses); other escapes are dropped."""
    lines, row, col = [""], 0, 0
    i = 0
    while i < len(raw):
        ch = raw[i]
        m = ESCAPE.match(raw, i)
        if m:
            if m.group() == "\x1b[K":
                lines[row] = lines[row][:col]
            i = m.end()
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            col = 0
            if row == len(lines):
                lines.append("")
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + ch + line[col + 1:]
            col += 1
        i += 1
    return [ln.rstrip() for ln in lines]


def test_progress_to_a_pipe_has_no_control_codes(server: rpycsvc.Server,
                                                 tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()  # no need to wait: nobody watches a pipe
    raw = subprocess.run([sys.executable, "-c", CHILD, server.address, str(gate)],
                         capture_output=True, timeout=WAIT, cwd=str(REPO),
                         stdin=subprocess.DEVNULL, env=ENV)
    # bytes, decoded by hand: text=True would turn a "\r" into "\n" and hide it
    out = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(),
                                      raw.stderr.decode())
    assert "\r" not in out.stderr and "\x1b" not in out.stderr, repr(out.stderr)
    assert out.returncode == 0, out.stderr
    assert "RESULT [0, 2, 4]" in out.stdout and "REDUCED 36" in out.stdout
    assert f"[{server.address}] REMOTE LINE\n" in out.stdout
    assert f"{server.address} REMOTE LOG\n" in out.stderr
    # one plain line per bar, at its end, so a log still says what happened
    summaries = [ln for ln in out.stderr.splitlines() if " done in " in ln]
    assert len(summaries) == 2, out.stderr
    assert summaries[0].startswith("3/3 done in ") and f"{server.address}:3" in summaries[0]
    assert summaries[1].startswith("12/12 done in ")
    assert f"{server.address}:12" in summaries[1]


def _read_until(fd: int, buf: bytearray, done: Callable[[bytearray], bool],
                deadline: float) -> bool:
    """Read the pty into ``buf`` until ``done(buf)`` or EOF; False if the deadline passed."""
    while not done(buf):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return True
        if not chunk:
            return True
        buf += chunk
    return True


def test_progress_on_a_terminal_keeps_remote_lines_above_the_bar(server: rpycsvc.Server,
                                                                 tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, server.address, str(gate)],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            cwd=str(REPO), env=ENV)
    os.close(slave)
    buf = bytearray()
    try:
        deadline = time.monotonic() + WAIT
        # the bar is up (item 0 done) while item 1 waits for the gate
        assert _read_until(master, buf, lambda b: b"1/3" in b, deadline), bytes(buf)
        gate.touch()
        assert _read_until(master, buf, lambda b: False, deadline), bytes(buf)
        returncode = proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)
        os.close(master)
    raw = buf.decode()
    assert "\r" in raw and "\x1b[K" in raw  # a live bar, redrawn in place
    lines = screen(raw)
    remote = f"[{server.address}] REMOTE LINE"
    log = f"{server.address} REMOTE LOG"  # a forwarded logging record, through its handler
    assert remote in lines and log in lines, lines  # lines of their own, not glued to the bar
    last = max(lines.index(remote), lines.index(log))
    below = lines[last + 1]
    assert below.startswith("[") and "3/3" in below, lines  # the bar, redrawn below them
    assert lines[last + 2] == "RESULT [0, 2, 4]", lines
    assert returncode == 0, raw
    assert any("12/12" in ln for ln in lines) and "REDUCED 36" in lines, lines  # map_reduce


def test_status_aligns_down_rows_with_the_others() -> None:
    up = ServerStatus("10.0.0.1:18812", rtt=0.001, stats={"cores": 2, "workers": 2})
    down = ServerStatus("a-long-host-name.example:18812", error="ConnectError: refused")
    header, *rows = format_table([up, down]).splitlines()[:3]
    state = header.index("STATE")
    assert [row[state:].split()[0] for row in rows] == ["up", "DOWN"], (header, rows)
    # all DOWN: the state column still lines up under its header
    header, *rows = format_table([down, ServerStatus("h:1", error="x")]).splitlines()[:3]
    assert [row[header.index("STATE"):].split()[0] for row in rows] == ["DOWN", "DOWN"]


def test_unique_addresses_merges_spellings_of_one_server() -> None:
    assert unique_addresses(["h", "h:18812", "127.0.0.1:5", ":5", "[::1]:7", "::1", "h",
                             "bad:port"]) == ["h:18812", "127.0.0.1:5", "[::1]:7",
                                              "[::1]:18812", "bad:port"]


def test_status_cli_merges_duplicates_and_aligns(server: rpycsvc.Server) -> None:
    port = server.address.rsplit(":", 1)[1]
    dead = "127.0.0.2:1"  # loopback, and nothing listens on port 1
    out = subprocess.run([sys.executable, "-m", "rpycsvc.cli", "status", server.address,
                          dead, f":{port}", server.address, dead, "--timeout", "5"],
                         capture_output=True, text=True, timeout=WAIT, cwd=str(REPO),
                         stdin=subprocess.DEVNULL, env=ENV)
    assert out.returncode == 1, out.stderr
    header, *rest = out.stdout.splitlines()
    rows = rest[:rest.index("")]  # the table ends at the blank line before the summary
    assert [r.split()[0] for r in rows] == [server.address, dead], out.stdout
    state = header.index("STATE")
    assert [r[state:].split()[0] for r in rows] == ["up", "DOWN"], out.stdout
    assert "1 of 2 servers up, 1 DOWN" in out.stdout


def _many_dead_addresses(n: int) -> list[str]:
    # distinct loopback hosts, port 1: refused at once, and enough rows to fill a pipe
    return [f"127.0.{1 + i // 250}.{1 + i % 250}:1" for i in range(n)]


def _pipe_into_head(args: list[str], unbuffered: bool) -> subprocess.CompletedProcess[str]:
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "rpycsvc.cli", *args])
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:  # as under python -u, or in the many container images that set it
        env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -1"],
                          capture_output=True, text=True, timeout=WAIT * 2, cwd=str(REPO),
                          stdin=subprocess.DEVNULL, env=env)


@pytest.mark.parametrize(("args", "unbuffered"), [
    (["status", "--json", "--timeout", "5"], False),
    (["status", "--json", "--timeout", "5"], True),
    (["status", "--timeout", "5"], False),
    (["top", "--once", "--interval", "0.1", "--timeout", "5"], False),
], ids=["status-json", "status-json-unbuffered", "status", "top-once"])
def test_piped_into_head_ends_quietly(args: list[str], unbuffered: bool) -> None:
    # ~600 rows (over 100 kB) are more than a pipe holds: the reader is gone before the end
    out = _pipe_into_head([*args, *_many_dead_addresses(600)], unbuffered)
    assert out.stderr == "", out.stderr
    assert len(out.stdout.splitlines()) == 1
    if not unbuffered:  # (unbuffered, Python drops the rest of a partial write silently)
        assert out.returncode == EXIT_STDOUT_CLOSED  # as for any program SIGPIPE ended


def test_demo_piped_into_head_ends_quietly() -> None:
    out = _pipe_into_head(["demo", "--servers", "1", "--tasks", "2"], unbuffered=True)
    assert out.stdout.startswith("started 1 local servers"), out.stdout
    assert out.stderr == "", out.stderr
    assert out.returncode == EXIT_STDOUT_CLOSED


@pytest.mark.parametrize("command", ["status", "top", "demo"])
def test_help_shows_every_default_and_no_rest_markup(command: str) -> None:
    out = subprocess.run([sys.executable, "-m", "rpycsvc.cli", command, "--help"],
                         capture_output=True, text=True, timeout=WAIT, cwd=str(REPO),
                         stdin=subprocess.DEVNULL, env={**ENV, "COLUMNS": "100"})
    assert out.returncode == 0, out.stderr
    # ours: the description and the command's own options (the "discovery" group of status
    # and top comes from rpycsvc.server.registry)
    text = out.stdout.split("\ndiscovery:", 1)[0]
    assert "`" not in text, text
    options = re.split(r"\n(?:options|optional arguments):\n", text, maxsplit=1)[1]
    # every option entry: a line starting with a dash, plus its continuation lines
    entries = re.split(r"\n  (?=-)", "\n" + options)[1:]
    assert entries, text
    for entry in entries:
        if entry.startswith("-h, --help"):
            continue
        assert "default" in " ".join(entry.split()), entry


#: A command body for ``ending_quietly_if_stdout_closes``: prints a lot, or hits a broken
#: pipe that is not stdout's (a socket whose peer closed).
BODY = r'''
import socket, sys
from rpycsvc.client.output import ending_quietly_if_stdout_closes

with ending_quietly_if_stdout_closes():
    if sys.argv[1] == "print":
        for i in range(100000):
            print("line", i)
    else:
        a, b = socket.socketpair()
        b.close()
        print("first", flush=True)
        for _ in range(100):
            a.sendall(b"x" * 4096)
'''


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_a_command_body_ends_quietly_when_stdout_closes(unbuffered: bool) -> None:
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    cmd = f"set -o pipefail; {shlex.quote(sys.executable)} -c {shlex.quote(BODY)} print | head -1"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=WAIT,
                         cwd=str(REPO), stdin=subprocess.DEVNULL, env=env)
    assert (out.stdout, out.stderr) == ("line 0\n", "")
    assert out.returncode == EXIT_STDOUT_CLOSED


def test_a_broken_pipe_that_is_not_stdouts_still_raises() -> None:
    out = subprocess.run([sys.executable, "-c", BODY, "socket"], capture_output=True,
                         text=True, timeout=WAIT, cwd=str(REPO), stdin=subprocess.DEVNULL,
                         env=ENV)
    assert out.stdout == "first\n"
    assert out.returncode == 1 and "BrokenPipeError" in out.stderr, out.stderr
