"""``rpycsvc.client.remote_session``, the engine under ``rpycsvc repl`` (and the notebook magic to
come), through its own small interface against a real server: a session is a process of its
own; output streams; an interrupt stops a blocked call; close and a dropped connection stop
its process tree."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

import rpycsvc
from rpycsvc.client.remote_session import RemoteSession, SessionError
from tests.support.servers import running_server

BOUND = 15.0


@pytest.fixture(scope="module")
def server() -> Iterator[rpycsvc.Server]:
    with running_server(workers=1) as srv:
        yield srv


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + BOUND
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def until_output(session: RemoteSession, marker: str) -> str:
    """Events until ``marker`` was printed (bounded); returns the output so far."""
    text = ""
    deadline = time.monotonic() + BOUND
    while marker not in text:
        assert time.monotonic() < deadline, f"no {marker!r} in {text!r}"
        for ev in session.events():
            assert ev[0] == "out", ev
            text += ev[2]
    return text


def until_done(session: RemoteSession) -> tuple[str, str]:
    """Events until the statement ends (bounded): its outcome and its output."""
    text = ""
    deadline = time.monotonic() + BOUND
    while True:
        assert time.monotonic() < deadline, f"still running; output {text!r}"
        for ev in session.events():
            if ev[0] == "done":
                return ev[1], text
            assert ev[0] == "out", ev
            text += ev[2]


def test_run_streams_output_in_a_process_of_its_own(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address) as client, RemoteSession(client.conn) as s:
        assert s.pid is not None and s.pid != os.getpid() and alive(s.pid)
        writes: list[tuple[int, str]] = []
        out = s.run("import os, sys\nprint('pid', os.getpid())\nprint('oops', file=sys.stderr)"
                    "\nx = 6 * 7\nx", lambda fd, text: writes.append((fd, text)))
        assert out == "ok"
        stdout = "".join(t for fd, t in writes if fd == 1)
        assert f"pid {s.pid}\n" in stdout and "42\n" in stdout
        assert "oops" in "".join(t for fd, t in writes if fd == 2)
        # names persist between runs, and complete
        assert "x" in s.complete("x") and "os.getpid" in s.complete("os.getp")
        assert s.run("1 / 0", lambda fd, t: writes.append((fd, t))) == "error"
        assert "ZeroDivisionError" in writes[-1][1]
        # the server process's namespace is another one
        assert client.eval("'x' in dir()") is False
        pid = s.pid
    wait_gone(pid)


def test_what_a_thread_prints_is_never_lost(server: rpycsvc.Server) -> None:
    # a thread prints while statements begin and end: every line shows, in order, with
    # the statement during or after which it came
    with rpycsvc.connect(server.address) as client, RemoteSession(client.conn) as s:
        writes: list[str] = []
        s.run("import threading, time\n"
              "def ticks():\n"
              "    for i in range(300):\n"
              "        print('tick', i, flush=True); time.sleep(0.002)\n"
              "    print('ticks ' + 'done', flush=True)\n"
              "threading.Thread(target=ticks).start()", lambda fd, t: writes.append(t))
        deadline = time.monotonic() + BOUND * 2
        while "ticks done" not in "".join(writes):
            assert time.monotonic() < deadline, "the thread never finished"
            s.run("pass", lambda fd, t: writes.append(t))
        lines = "".join(writes).splitlines()
        assert lines == [f"tick {i}" for i in range(300)] + ["ticks done"]


def test_interrupt_stops_a_blocked_call(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address) as client, RemoteSession(client.conn) as s:
        assert s.interrupt() is False  # nothing runs
        s.start("import time\nprint('nap' + 'ping', flush=True)\ntime.sleep(30)")
        until_output(s, "napping")
        assert s.interrupt() is True
        outcome, text = until_done(s)
        assert outcome == "interrupted" and "KeyboardInterrupt" in text


def test_interrupt_right_after_start_is_not_lost(server: rpycsvc.Server) -> None:
    # a SIGINT that reaches the session before it armed its handler for the statement
    # must not be taken for a late one of the statement before
    with rpycsvc.connect(server.address) as client, RemoteSession(client.conn) as s:
        for _ in range(5):
            s.start("import time; time.sleep(30)")
            assert s.interrupt() is True
            outcome, text = until_done(s)
            assert outcome == "interrupted" and "KeyboardInterrupt" in text


def test_interrupt_that_lands_where_python_cannot_raise_is_delivered_again(
        server: rpycsvc.Server) -> None:
    # A SIGINT handled inside a weakref callback (as in import's machinery, seen in CI) is
    # only printed by Python ("Exception ignored in ..."), and the statement would go on.
    source = ("import os, signal, time, weakref\n"
              "class C: pass\n"
              "def callback(ref):\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    for _ in range(100000): pass  # the handler runs in here\n"
              "c = C(); r = weakref.ref(c, callback); del c\n"
              "time.sleep(10)\n")
    with rpycsvc.connect(server.address) as client, RemoteSession(client.conn) as s:
        s.start(source)
        outcome, text = until_done(s)
        assert outcome == "interrupted" and "KeyboardInterrupt" in text
        assert "Exception ignored" not in text
        s.start("print('next')")
        assert until_done(s) == ("ok", "next\n")


def test_close_stops_the_process_tree_even_mid_statement(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address) as client:
        s = RemoteSession(client.conn)
        s.start("import subprocess, time\np = subprocess.Popen(['sleep', '32.618'])\n"
                "print('child', p.pid, flush=True)\ntime.sleep(30)")
        grandchild = int(until_output(s, "\n").split()[1])
        assert alive(grandchild)
        session_pid = s.pid
        assert session_pid is not None
        s.close()
        wait_gone(session_pid)
        wait_gone(grandchild)
        assert client.eval("1 + 1") == 2  # the connection goes on


def test_session_stops_when_its_connection_closes(server: rpycsvc.Server) -> None:
    client = rpycsvc.connect(server.address)
    try:
        s = RemoteSession(client.conn)
        s.start("import time\nprint('wait' + 'ing', flush=True)\ntime.sleep(30)")
        until_output(s, "waiting")
        pid = s.pid
        assert pid is not None
    finally:
        client.close()  # no close() of the session: the server stops it with the connection
    wait_gone(pid)


def test_session_that_exits_is_reported(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address) as client, RemoteSession(client.conn) as s, \
            pytest.raises(SessionError, match="exit status 5"):
        s.run("import os; os._exit(5)", lambda fd, t: None)


SERVE_VENDORED = '''
import os, sys
import rpycsvc
from rpycsvc.client.remote_session import RemoteSession, SessionError
assert os.path.dirname(os.path.dirname(rpycsvc.__file__)) == os.path.dirname(__file__)
srv = rpycsvc.Server(rpycsvc.ServerConfig(port=0, workers=1))
srv.start()
try:
    with rpycsvc.connect(srv.address) as client:
        with RemoteSession(client.conn, timeout=30) as s:
            out = []
            s.run("print(6 * 7)", lambda fd, text: out.append(text))
            print("session ran:", "".join(out).strip())
finally:
    srv.close(grace=0)
'''


def test_a_session_imports_the_servers_own_rpycsvc(tmp_path: os.PathLike[str]) -> None:
    """A server whose rpycsvc is importable only from its script's folder (vendored: not
    installed, not on PYTHONPATH, not the cwd): the session process finds rpycsvc where the
    server found it (review finding: it looked one folder too deep after the package got
    folders, and every session failed with ModuleNotFoundError)."""
    import importlib.util
    import shutil
    import subprocess
    from pathlib import Path

    system = "/usr/bin/python3"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}

    def system_runs(code: str) -> bool:
        return subprocess.run([system, "-c", code], cwd="/", env=env,
                              capture_output=True).returncode == 0

    if not os.path.exists(system) or not system_runs(
            "import sys; assert sys.version_info >= (3, 9)"):
        pytest.skip("needs the system's python3, 3.9 or newer")
    if system_runs("import rpycsvc"):
        pytest.skip("the system's python3 has rpycsvc installed: it would hide the case")
    app = Path(tmp_path) / "app"
    app.mkdir()
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(Path(rpycsvc.__file__).parent, app / "rpycsvc", ignore=ignore)
    for name in ("rpyc", "plumbum", "cloudpickle"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations
        shutil.copytree(next(iter(spec.submodule_search_locations)), app / name,
                        ignore=ignore)
    (app / "serve.py").write_text(SERVE_VENDORED)
    res = subprocess.run([system, str(app / "serve.py")], cwd="/", capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 0 and "session ran: 42" in res.stdout, res.stdout + res.stderr
