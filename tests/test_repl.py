"""``rpycsvc repl`` driven through a pseudo-terminal (pexpect): statements run in the server
process, their prints show here, Tab completes remote names, Ctrl-C interrupts the remote
statement and the session goes on. Plus the API underneath and ``post_mortem``."""

from __future__ import annotations

import io
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

import rpycsvc
from rpycsvc.cli.repl import RemoteRepl, post_mortem
from tests.support.servers import REPO, ServerProcess, running_server

WAIT = 20.0
PROMPT = ">>> "


@pytest.fixture(scope="module")
def server_proc() -> Iterator[ServerProcess]:
    with ServerProcess("--workers", "1") as proc:
        yield proc


@pytest.fixture
def repl(server_proc: ServerProcess, tmp_path: Path) -> Iterator[pexpect.spawn]:
    inputrc = tmp_path / "inputrc"
    inputrc.write_text("set enable-bracketed-paste off\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(tmp_path), TERM="dumb",
               INPUTRC=str(inputrc))
    child = pexpect.spawn(sys.executable, ["-m", "rpycsvc.cli", "repl", server_proc.address],
                          env=env, cwd=str(REPO), encoding="utf-8", timeout=WAIT,
                          dimensions=(24, 200))
    try:
        child.expect_exact(PROMPT)
        yield child
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.close()


def session_pid(child: pexpect.spawn) -> int:
    return int(run_line(child, "__import__('os').getpid()").splitlines()[-1].strip())


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, bound: float = WAIT) -> None:
    deadline = time.monotonic() + bound
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def children(pid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the live children of ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append((int(entry), argv))
    return found


def run_line(child: pexpect.spawn, line: str) -> str:
    """Send one line, wait for the next prompt; returns what came between."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return str(child.before)


def test_statements_run_on_the_server(repl: pexpect.spawn, server_proc: ServerProcess,
                                      tmp_path: Path) -> None:
    # in a session process of its own, a child of the server
    assert run_line(repl, "import os; os.getppid()").splitlines()[-1].strip() == str(
        server_proc.pid)
    # prints happen on the server and show here (the echoed line holds no "42")
    assert "hello 42" in run_line(repl, "print('hello', 6 * 7)")
    assert "ZeroDivisionError" in run_line(repl, "1 / 0")
    assert run_line(repl, "_answer = 40 + 2; _answer").splitlines()[-1].strip() == "42"
    pid = session_pid(repl)
    assert pid != server_proc.pid
    repl.sendeof()
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0
    wait_gone(pid)  # leaving stops the session process
    history = (tmp_path / ".rpycsvc_history").read_text().splitlines()
    assert "print('hello', 6 * 7)" in history


def test_ctrl_c_interrupts_the_remote_statement(repl: pexpect.spawn) -> None:
    # the marker is computed, so seeing it means the statement runs (the echo can't match)
    repl.sendline("print('spin' + 'ning'); exec('while True: pass')")
    repl.expect_exact("spinning")
    repl.sendintr()
    repl.expect_exact("KeyboardInterrupt")
    repl.expect_exact(PROMPT)
    assert re.search(r"^2\s*$", run_line(repl, "1 + 1"), re.M)
    # a compound statement, and the namespace survived the interrupt
    repl.sendline("for i in range(3):")
    repl.expect_exact("... ")
    repl.sendline("    print('line', i * 10)")
    repl.expect_exact("... ")
    out = run_line(repl, "")
    assert "line 0" in out and "line 20" in out
    # Ctrl-C at a continuation prompt drops the statement begun and keeps the session.
    # (Not with keys typed ahead on the line: GNU readline can then sit in its own read
    # loop, ignoring SIGINT until the next key, as in the stock Python REPL.) A SIGINT that
    # lands just outside readline's select() is also missed; like a user, press again.
    repl.sendline("for j in range(3):")
    repl.expect_exact("... ")
    for _ in range(5):
        repl.sendintr()
        if repl.expect_exact(["KeyboardInterrupt", pexpect.TIMEOUT], timeout=2) == 0:
            break
    else:
        raise AssertionError("Ctrl-C at the prompt was never noticed")
    repl.expect_exact(PROMPT)
    assert re.search(r"^7\s*$", run_line(repl, "3 + 4"), re.M)


def test_statement_ignoring_ctrl_c_can_be_abandoned(repl: pexpect.spawn) -> None:
    pid = session_pid(repl)
    repl.sendline("import time\nwhile True:\n    try:\n        print('st' + 'ubborn', "
                  "flush=True); time.sleep(20)\n    except KeyboardInterrupt:\n        pass\n")
    repl.expect_exact("stubborn")
    for _ in range(12):  # Ctrl-Cs within one poll count once: press until it gives up
        repl.sendintr()
        if repl.expect_exact(["stopping the session", "more time", pexpect.TIMEOUT],
                             timeout=2) == 0:
            break
    else:
        raise AssertionError("repeated Ctrl-C never gave up on the statement")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 1
    wait_gone(pid)


def test_a_session_process_that_dies_is_reported(repl: pexpect.spawn,
                                                  server_proc: ServerProcess) -> None:
    repl.sendline("import os; os._exit(3)")
    repl.expect_exact("the session process ended (exit status 3)")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 1
    assert alive(server_proc.pid)  # the server itself goes on


def test_tab_completes_remote_names(repl: pexpect.spawn) -> None:
    run_line(repl, "remote_only_value_xyz = 5; import os")
    repl.send("remote_only_va\t")
    repl.expect_exact("remote_only_value_xyz")
    assert re.search(r"^5\s*$", run_line(repl, ""), re.M)
    repl.send("os.getpp\t")
    repl.expect_exact("os.getppid")
    run_line(repl, "()")


def test_api_execute_complete_and_output() -> None:
    out, err = io.StringIO(), io.StringIO()
    with running_server(workers=1) as srv, RemoteRepl(srv.address, stdout=out,
                                                      stderr=err) as repl:
        assert repl.execute("x = 6 * 7") == "ok"
        assert repl.execute("print(x, end='!')") == "ok"
        assert repl.execute("x") == "ok"
        assert repl.execute("raise ValueError('nope')") == "error"
        assert repl.execute("def f(:") == "error"
        assert repl.execute("raise SystemExit(3)") == "error"  # never ends the server
        assert repl.execute("import os; os.getpid() == __import__('os').getpid()") == "ok"
        assert repl._complete("x") and "x" in repl._complete("x")
        assert "os.getcwd" in repl._complete("os.getc")
        # completion evaluates dotted names only: it never calls anything on the server
        assert repl.execute("calls = []\ndef h():\n    calls.append(1)\n    return 1") == "ok"
        assert repl._complete("h().") == ()
        assert repl.execute("assert calls == []") == "ok"
    assert out.getvalue().startswith("42!42\n")
    assert "ValueError: nope" in err.getvalue() and "SyntaxError" in err.getvalue()
    assert "SystemExit: 3" in err.getvalue()


def test_service_only_server_refuses() -> None:
    with running_server(workers=1, classic=False) as srv, pytest.raises(
            rpycsvc.ConfigError, match="service-only"):
        RemoteRepl(srv.address)


def _fails(n: int) -> None:
    secret = n * 3
    raise LookupError(f"no item {secret}")


def test_post_mortem_of_a_task(server: rpycsvc.Server, client: rpycsvc.Client) -> None:
    with pytest.raises(LookupError) as info:
        client.compute(_fails, 7)
    out = io.StringIO()
    post_mortem(info.value, client, interactive=True, file=out)
    text = out.getvalue()
    assert f"Remote traceback (on {server.address})" in text
    assert "_fails" in text and "LookupError: no item 21" in text
    assert "stayed in a worker process" in text  # honest: no frames to inspect


def test_post_mortem_of_a_classic_call_opens_pdb_on_the_server(client: rpycsvc.Client) -> None:
    client.execute("def g(n):\n    secret = n * 3\n    return 1 // (n - n)\n")
    with pytest.raises(ZeroDivisionError) as info:
        client.eval("g(5)")
    out = io.StringIO()
    post_mortem(info.value, client, interactive=True, file=out,
                stdin=io.StringIO("p secret\nq\n"))
    text = out.getvalue()
    assert "Remote traceback" in text and "ZeroDivisionError" in text
    assert "(Pdb) 15\n" in text  # pdb printed the remote frame's local


def test_post_mortem_of_a_local_exception() -> None:
    out = io.StringIO()
    try:
        raise KeyError("here")
    except KeyError as exc:
        post_mortem(exc, file=out)
    assert "no remote traceback" in out.getvalue() and "KeyError" in out.getvalue()


# --- Ctrl-C stops a statement blocked in C, as locally (issue 17) -------------------------
def interrupt_blocked(repl: pexpect.spawn, statement: str, marker: str) -> str:
    """Run ``statement`` (which prints ``marker`` computed, then blocks), press Ctrl-C once
    and wait for the prompt: the KeyboardInterrupt must come long before the 30 s block
    ends (the pexpect bound is 15 s). Returns the traceback text."""
    repl.sendline(statement)
    repl.expect_exact(marker)
    repl.sendintr()
    repl.expect_exact("KeyboardInterrupt", timeout=15)
    text = str(repl.before)
    repl.expect_exact(PROMPT, timeout=15)
    return text


def test_ctrl_c_stops_time_sleep(repl: pexpect.spawn) -> None:
    run_line(repl, "import time; kept = 'still ' + 'here'")
    text = interrupt_blocked(repl, "print('sl' + 'eeping', flush=True); time.sleep(30)",
                             "sleeping")
    # the traceback ends at the user's line, as locally: no frame of ours
    assert "<remote-" in text and "rpycsvc" not in text
    assert "still here" in run_line(repl, "kept")  # the session's variables survive


def test_ctrl_c_stops_a_socket_recv(repl: pexpect.spawn) -> None:
    run_line(repl, "import socket; a, b = socket.socketpair()")
    interrupt_blocked(repl, "print('rec' + 'eiving', flush=True); a.recv(1)", "receiving")
    # the sockets survive too, and work
    assert "b'x'" in run_line(repl, "b.send(b'x'); a.recv(1)")


def test_ctrl_c_stops_subprocess_run_and_its_child(repl: pexpect.spawn) -> None:
    pid = session_pid(repl)
    repl.sendline("import subprocess; subprocess.run(['sleep', '29.4517'])")
    deadline = time.monotonic() + 15
    while not [p for p, argv in children(pid) if argv == ["sleep", "29.4517"]]:
        assert time.monotonic() < deadline, "the session never started sleep"
        time.sleep(0.05)
    repl.sendintr()
    repl.expect_exact("KeyboardInterrupt", timeout=15)
    repl.expect_exact(PROMPT, timeout=15)
    assert not [p for p, argv in children(pid) if argv[:1] == ["sleep"]]
    assert alive(pid) and session_pid(repl) == pid  # the same session goes on


def test_input_reads_the_terminal(repl: pexpect.spawn) -> None:
    # prompts are computed: the echo of the line typed can't match them
    repl.sendline("name = input('your ' + 'name? ')")
    repl.expect_exact("your name? ")
    repl.sendline("Ada")
    repl.expect_exact(PROMPT)
    assert "'Ada!'" in run_line(repl, "name + '!'")
    # sys.stdin too; and Ctrl-D at input() is EOFError, as locally
    repl.sendline("import sys; line = sys.stdin.readline()")
    repl.sendline("from stdin")
    repl.expect_exact(PROMPT)
    assert "'from stdin\\n'" in run_line(repl, "line")
    repl.sendline("input('mo' + 're? ')")
    repl.expect_exact("more? ")
    repl.sendeof()
    repl.expect_exact("EOFError")
    repl.expect_exact(PROMPT)
    # Ctrl-C at input() interrupts the statement
    repl.sendline("input('aga' + 'in? ')")
    repl.expect_exact("again? ")
    repl.sendintr()
    repl.expect_exact("KeyboardInterrupt")
    repl.expect_exact(PROMPT)
    assert re.search(r"^3\s*$", run_line(repl, "1 + 2"), re.M)


def test_pdb_post_mortem_in_the_session(repl: pexpect.spawn) -> None:
    run_line(repl, "def g(n):\n    secret = n * 3\n    return 1 // (n - n)\n")
    assert "ZeroDivisionError" in run_line(repl, "g(5)")
    repl.sendline("import pdb; pdb.pm()")
    repl.expect_exact("(Pdb) ")
    repl.sendline("p secret")
    repl.expect(r"\r\n15\r\n")
    repl.expect_exact("(Pdb) ")
    repl.sendline("q")
    repl.expect_exact(PROMPT)


def test_program_output_shows_in_the_session(repl: pexpect.spawn) -> None:
    # what a program the session starts prints reaches us too (descriptor 1 of the session)
    assert "from a child 7" in run_line(
        repl, "import subprocess; subprocess.run(['sh', '-c', 'echo from a child $((3+4))'])")


def test_input_without_a_terminal_says_why() -> None:
    out, err = io.StringIO(), io.StringIO()
    with running_server(workers=1) as srv, RemoteRepl(srv.address, stdout=out, stderr=err,
                                                      stdin=io.StringIO("typed\n")) as repl:
        assert repl.execute("got = input('q? ')") == "ok"
        assert repl.execute("print(repr(got))") == "ok"
        assert repl.execute("input()") == "error"  # our stdin is at its end: EOFError
        writes: list[tuple[int, str]] = []
        assert repl.session.run("input('x')", lambda fd, t: writes.append((fd, t))) == "error"
    assert "'typed'" in out.getvalue()
    text = "".join(t for _, t in writes)
    assert "EOFError: input() can't read a line" in text and "no terminal" in text


def test_session_process_ends_with_its_connection(server_proc: ServerProcess) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = pexpect.spawn(sys.executable, ["-m", "rpycsvc.cli", "repl", "--no-history",
                                           server_proc.address],
                          env=env, cwd=str(REPO), encoding="utf-8", timeout=WAIT)
    try:
        child.expect_exact(PROMPT)
        pid = session_pid(child)
        child.sendline("import subprocess; p = subprocess.Popen(['sleep', '31.7215'])")
        child.expect_exact(PROMPT)
        grandchild = int(run_line(child, "p.pid").splitlines()[-1].strip())
        assert alive(grandchild)
        child.kill(9)  # no goodbye: the server sees the connection drop
        wait_gone(pid)
        wait_gone(grandchild)  # its process group went with it
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.close()
