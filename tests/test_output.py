"""Remote stdout/stderr/logging reach the client live, per task, attributed to the server."""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from pathlib import Path

import pytest
import rpyc

import rpycsvc
from tests.support.logs import Collect


def _print_then_wait(gate: str, timeout: float = 30.0) -> str:
    print("first line", flush=True)
    deadline = time.monotonic() + timeout
    while not Path(gate).exists():
        if time.monotonic() > deadline:
            return "gate never opened"
        time.sleep(0.01)
    print("last line")
    return "done"


def test_a_line_arrives_before_its_task_ends(server: rpycsvc.Server, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with rpycsvc.connect(server.address, output="capture") as c:
        fut = c.submit(_print_then_wait, str(gate))
        deadline = time.monotonic() + 20
        while "first line" not in fut.stdout and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fut.stdout == "first line\n"
        assert not fut.done()  # the line came while the task was still running
        gate.touch()
        assert fut.result(timeout=20) == "done"
        assert fut.stdout == "first line\nlast line\n"


def test_stream_mode_prefixes_each_line_with_the_server(
    server: rpycsvc.Server, capfd: pytest.CaptureFixture[str]
) -> None:
    with rpycsvc.connect(server.address) as c:
        c.compute(lambda: print("one\ntwo") or sys.stderr.write("oops\n"))
    out, err = capfd.readouterr()
    assert f"[{server.address}] one\n[{server.address}] two\n" in out
    assert f"[{server.address}] oops\n" in err


def test_custom_prefix_with_task(server: rpycsvc.Server, capfd: pytest.CaptureFixture[str]) -> None:
    with rpycsvc.connect(server.address, prefix="<{address} #{task}> ") as c:
        c.compute(print, "hi")
    assert f"<{server.address} #1> hi\n" in capfd.readouterr().out


def test_capture_and_discard(server: rpycsvc.Server, capfd: pytest.CaptureFixture[str]) -> None:
    with rpycsvc.connect(server.address, output="capture") as c:
        fut = c.submit(lambda: print("to out") or print("to err", file=sys.stderr))
        fut.result(timeout=20)
        assert (fut.stdout, fut.stderr) == ("to out\n", "to err\n")
        quiet = c.options(output="discard").submit(print, "never seen")
        quiet.result(timeout=20)
        assert quiet.stdout == ""
    with rpycsvc.connect(server.address, output="discard") as c:
        c.compute(print, "dropped")
    assert "dropped" not in capfd.readouterr().out


def _many_lines(tag: str, n: int) -> None:
    for i in range(n):
        sys.stdout.write(f"{tag} ")  # one line in three writes: must never be split
        sys.stdout.write(f"{i} ")
        sys.stdout.write("end\n")


def test_two_clients_at_once_each_get_exactly_their_lines(server: rpycsvc.Server) -> None:
    results: dict[str, str] = {}

    def run(tag: str) -> None:
        with rpycsvc.connect(server.address, output="capture") as c:
            fut = c.submit(_many_lines, tag, 300)
            fut.result(timeout=60)
            results[tag] = fut.stdout

    threads = [threading.Thread(target=run, args=(t,)) for t in ("alpha", "beta")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for tag in ("alpha", "beta"):
        assert results[tag].splitlines() == [f"{tag} {i} end" for i in range(300)]


def test_thread_mode_tasks_lines_never_interleave(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address, output="capture") as c:
        futs = [c.options(mode="thread").submit(_many_lines, f"t{k}", 100) for k in range(4)]
        for k, f in enumerate(futs):
            f.result(timeout=60)
            assert f.stdout.splitlines() == [f"t{k} {i} end" for i in range(100)]


def _child_process_output() -> None:
    import os
    import subprocess

    subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
    os.write(1, b"raw fd write\n")
    os.write(2, b"raw fd error\n")


def test_fd_level_output_of_a_subprocess(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address, output="capture") as c:
        fut = c.submit(_child_process_output)
        fut.result(timeout=30)
    assert "from a child process\n" in fut.stdout
    assert "raw fd write\n" in fut.stdout
    assert "raw fd error\n" in fut.stderr


def _logs() -> None:
    log = logging.getLogger("app.remote")
    log.info("info record %d", 1)
    log.warning("warning record")
    log.debug("debug record")


def test_logging_forwarded_into_client_logging(server: rpycsvc.Server) -> None:
    handler = Collect()
    logger = logging.getLogger("app.remote")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with rpycsvc.connect(server.address, output="capture", forward_logging=True) as c:
            fut = c.submit(_logs)
            fut.result(timeout=30)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    got = [(r.levelname, r.getMessage(), r.server) for r in handler.records]  # type: ignore[attr-defined]
    assert got == [("INFO", "info record 1", server.address),
                   ("WARNING", "warning record", server.address)]
    assert fut.stderr == ""  # forwarded, not also printed


def test_without_forwarding_warnings_go_to_stderr(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address, output="capture") as c:
        fut = c.submit(_logs)
        fut.result(timeout=30)
    assert fut.stderr == "warning record\n"


def test_classic_redirected_stdout_per_connection(server: rpycsvc.Server) -> None:
    mine, theirs = io.StringIO(), io.StringIO()
    a = rpycsvc.connect(server.address)
    b = rpyc.classic.connect("127.0.0.1", server.port)
    try:
        with rpycsvc.redirected_stdout(a, mine):
            with rpycsvc.redirected_stdout(b, theirs):
                a.execute("print('from a')")
                b.execute("print('from b')")
            b.execute("print('b after its block')")
        a.execute("print('a after its block')")
        with pytest.raises(ZeroDivisionError):  # noqa: SIM117
            with rpycsvc.redirected_stdout(a, mine):
                a.execute("print('before the error')")
                a.execute("1/0")
        a.execute("print('a after the error')")
        err = io.StringIO()
        with rpycsvc.redirected_stderr(a, err):
            a.execute("import sys; print('to stderr', file=sys.stderr)")
    finally:
        a.close()
        b.close()
    assert mine.getvalue() == "from a\nbefore the error\n"
    assert theirs.getvalue() == "from b\n"
    assert err.getvalue() == "to stderr\n"


def test_rpyc_tutorial_stdout_line_and_restore_on_disconnect(server: rpycsvc.Server) -> None:
    buf = io.StringIO()
    c = rpyc.classic.connect("127.0.0.1", server.port)
    c.modules.sys.stdout = buf
    c.execute("print('hi')")
    assert buf.getvalue() == "hi\n"
    c.close()
    # the server put its own stdout back when that client left: others can still print
    with rpycsvc.connect(server.address) as other:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                other.execute("print('server still prints')")
                break
            except EOFError:
                time.sleep(0.02)
        else:
            raise AssertionError("server stdout stayed bound to the departed client")
