"""``Cluster.local``'s servers live exactly as long as the client that started them.

A Ctrl-C (or a Jupyter kernel interrupt: SIGINT to the client's whole process group) must
interrupt the client's code, not kill the servers under it; and a client that dies, even
by SIGKILL, must take its servers and their workers with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WAIT = 60.0

CLIENT = textwrap.dedent("""
    import json, sys, time
    import rpycsvc

    cluster = rpycsvc.Cluster.local(1, workers=1)
    stats = cluster.clients[0].stats()
    pids = [stats["pid"], *stats["worker_pids"]]
    try:  # the test interrupts us once it has this line: print it inside the try
        print(json.dumps(pids), flush=True)
        time.sleep(120)  # the test interrupts or kills us here
    except KeyboardInterrupt:
        print(cluster.submit(abs, -4).result(30), flush=True)  # the servers still serve
    cluster.close()
    print("closed", flush=True)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float = WAIT) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    return left


def _start_client(tmp_path: Path) -> tuple[subprocess.Popen[str], list[int]]:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # Its own session and process group, as a terminal would give it: the test can then
    # signal the whole group as Ctrl-C does.
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the client printed no pids"
    return proc, json.loads(line)


def _reap(proc: subprocess.Popen[str], pids: list[int]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for pid in _wait_gone(pids, 20):  # last resort: ours, by pid
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(180)
def test_ctrl_c_to_the_clients_process_group_leaves_its_local_servers_serving(
        tmp_path: Path) -> None:
    proc, pids = _start_client(tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, _ = proc.communicate(timeout=WAIT)
        assert out.split() == ["4", "closed"], out
        assert proc.returncode == 0
        assert _wait_gone(pids) == []  # close() stopped them
    finally:
        _reap(proc, pids)


@pytest.mark.timeout(180)
def test_a_sigkilled_client_takes_its_local_servers_and_workers_with_it(
        tmp_path: Path) -> None:
    proc, pids = _start_client(tmp_path)
    try:
        assert all(_alive(p) for p in pids)
        proc.kill()  # no handler, no atexit: only the kernel closes its pipes
        proc.wait(10)
        assert _wait_gone(pids) == [], "a local server or worker outlived its client"
    finally:
        _reap(proc, pids)


def test_exit_on_stdin_eof_is_in_serve_help() -> None:
    res = subprocess.run([sys.executable, "-m", "rpycsvc.cli", "serve", "--help"],
                         capture_output=True, text=True, timeout=WAIT, cwd=str(REPO))
    assert "--exit-on-stdin-eof" in res.stdout


FORKING_CLIENT = textwrap.dedent("""
    import json, os, sys, time
    import rpycsvc

    cluster = rpycsvc.Cluster.local(1, workers=1)
    stats = cluster.clients[0].stats()
    pids = [stats["pid"], *stats["worker_pids"]]
    child = os.fork()  # as multiprocessing's "fork" start method does
    if child == 0:
        time.sleep(600)  # outlives the client; the test kills it by pid
        os._exit(0)
    print(json.dumps({"servers": pids, "child": child}), flush=True)
    time.sleep(120)  # the test kills us here
""")


@pytest.mark.timeout(180)
def test_a_forked_child_does_not_keep_a_sigkilled_clients_local_servers_alive(
        tmp_path: Path) -> None:
    script = tmp_path / "forking_client.py"
    script.write_text(FORKING_CLIENT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-W", "ignore", str(script)],
                            stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    pids: list[int] = []
    child = 0
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the client printed no pids"
        info = json.loads(line)
        pids, child = info["servers"], info["child"]
        assert all(_alive(p) for p in pids) and _alive(child)
        proc.kill()  # the forked child still holds whatever it inherited
        proc.wait(10)
        assert _wait_gone(pids) == [], "a forked child kept the dead client's servers running"
        assert _alive(child), "the forked child should still be running"
    finally:
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap(proc, pids)
