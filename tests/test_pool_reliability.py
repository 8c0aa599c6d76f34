"""The worker pool under stress: process trees, forking tasks, freezes, draining, stray fds.

Regression tests for issue 13 items 1 (server side), 5 (pool side), 6, 13, 14, 15 and 16,
against public behaviour only (results, errors, pids, ``stats()``), on real servers.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import rpycsvc
from rpycsvc import ServerDrainingError, TaskTimeoutError, WorkerCrashedError
from tests.support.servers import ServerProcess, running_server

# -- helpers -----------------------------------------------------------------------------


def wait_until(what: str, pred: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``pred`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def read_pid(path: Path, timeout: float = 30.0) -> int:
    wait_until(f"a pid in {path}", path.exists, timeout)
    return int(path.read_text())


def gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (exited, or a zombie nobody reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_if_alive(pid: int | None) -> None:
    if pid is not None and not gone(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# -- tasks (run in workers; module-level so they pickle by reference) ----------------------


def spawn_sleep_and_block(pidfile: str) -> None:
    """Start ``sleep 30`` as a child, say its pid, then block past any timeout."""
    import subprocess

    child = subprocess.Popen(["sleep", "30"])
    write_atomically(pidfile, str(child.pid))
    time.sleep(60)


def fork_then_crash(pidfile: str) -> None:
    """Fork a child that sleeps 30 s (holding whatever it inherited), then die."""
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    write_atomically(pidfile, str(pid))
    os._exit(3)


def fork_and_print() -> int:
    """Fork a child that prints (through ``print``), wait for it, return its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            print("hello from the forked child")
            sys.stdout.flush()
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def c_fork_then_crash(pidfile: str) -> None:
    """Like :func:`fork_then_crash`, but forked in C: no ``os.register_at_fork`` hook runs,
    so the child keeps every descriptor the worker had (its channel included)."""
    import ctypes

    libc = ctypes.PyDLL(None)  # (PyDLL: the GIL stays held across the fork)
    pid = libc.fork()
    if pid == 0:
        libc.sleep(30)
        libc._exit(0)
    write_atomically(pidfile, str(pid))
    os._exit(3)


def sockets_a_forked_child_holds() -> list[str]:
    """The socket descriptors a child forked by this task (no exec) holds."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            found = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                        found.append(fd)
                except OSError:
                    pass
            os.write(w, ",".join(found).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return [fd for fd in data.decode().split(",") if fd]


def sockets_an_exec_child_holds() -> list[str]:
    """The socket descriptors a program started by this task (fds inherited) holds."""
    import subprocess

    out = subprocess.run(["ls", "-l", "/proc/self/fd"], close_fds=False,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "socket:" in line]


def noop(x: int = 0) -> int:
    return x


def wait_for_file(startfile: str, gofile: str, result: int) -> int:
    """Say we started, wait (bounded) for ``gofile``, then work 0.3 s and return."""
    write_atomically(startfile, str(os.getpid()))
    deadline = time.monotonic() + 120
    while not os.path.exists(gofile) and time.monotonic() < deadline:
        time.sleep(0.01)
    t = time.monotonic() + 0.3  # (measured, not slept: a freeze must not shorten it)
    while time.monotonic() < t:
        time.sleep(0.01)
    return result


def close_stdout_and_stderr() -> str:
    os.close(1)
    os.close(2)
    return "closed"


def write_to_fd1(text: str) -> str:
    os.write(1, text.encode())
    return "written"


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# -- item 13: a stopped task's process tree dies with it ------------------------------------


@pytest.fixture(scope="module")
def one_worker() -> Iterator[rpycsvc.Server]:
    with running_server(workers=1) as srv:
        yield srv


def test_timeout_kills_the_tasks_children(one_worker: rpycsvc.Server, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    child = None
    try:
        with rpycsvc.connect(one_worker.address, output="discard") as c:
            # 5 s: long enough for the worker to unpickle the task (importing this test
            # module) and start the child on a loaded machine, before the timeout ends it
            fut = c.options(timeout=5).submit(spawn_sleep_and_block, str(pidfile))
            child = read_pid(pidfile)
            with pytest.raises(TaskTimeoutError) as info:
                fut.result(timeout=60)
        wait_until(f"the task's child {child} to be killed with the task", lambda: gone(child),
                   timeout=10)
        assert "every process it started" in str(info.value)
    finally:
        kill_if_alive(child)


def test_cancel_kills_the_tasks_children(one_worker: rpycsvc.Server, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    child = None
    try:
        with rpycsvc.connect(one_worker.address, output="discard") as c:
            fut = c.submit(spawn_sleep_and_block, str(pidfile))
            child = read_pid(pidfile)
            assert fut.stop()
            wait_until(f"the cancelled task's child {child} to be killed",
                       lambda: gone(child), timeout=10)
            assert c.compute(noop, 5) == 5  # the worker was replaced and serves
    finally:
        kill_if_alive(child)


def test_thread_mode_timeout_says_what_it_can_not_stop(one_worker: rpycsvc.Server) -> None:
    with rpycsvc.connect(one_worker.address, output="discard") as c:
        with pytest.raises(TaskTimeoutError) as info:
            c.options(timeout=0.3, mode="thread").compute(sleep_for, 3)
        text = str(info.value)
        assert "thread-mode" in text and "blocked in C" in text and "mode='process'" in text


# -- item 14: a task that forks doesn't delay crash detection; no channel in its children ----


def test_forking_task_that_crashes_is_reported_promptly(one_worker: rpycsvc.Server,
                                                        tmp_path: Path) -> None:
    pidfile = tmp_path / "forked.pid"
    child = None
    try:
        with rpycsvc.connect(one_worker.address, output="discard") as c:
            fut = c.submit(fork_then_crash, str(pidfile))
            # bounded well under the forked child's 30 s life, which used to hide the death
            with pytest.raises(WorkerCrashedError, match="exit code 3"):
                fut.result(timeout=10)
            child = read_pid(pidfile)
            assert c.compute(noop, 7) == 7
    finally:
        kill_if_alive(child)


def test_crash_is_seen_while_a_c_forked_child_holds_the_channel(one_worker: rpycsvc.Server,
                                                                tmp_path: Path) -> None:
    # The worker's death itself is watched, not the end of its channel.
    pidfile = tmp_path / "forked.pid"
    child = None
    try:
        with rpycsvc.connect(one_worker.address, output="discard") as c:
            fut = c.submit(c_fork_then_crash, str(pidfile))
            with pytest.raises(WorkerCrashedError, match="exit code 3"):
                fut.result(timeout=10)
            child = read_pid(pidfile)
            assert c.compute(noop, 8) == 8
    finally:
        kill_if_alive(child)


def test_forked_childs_prints_are_the_tasks_output(one_worker: rpycsvc.Server) -> None:
    with rpycsvc.connect(one_worker.address, output="capture") as c:
        fut = c.submit(fork_and_print)
        assert fut.result(timeout=60) == 0
        wait_until("the child's print", lambda: "hello from the forked child" in fut.stdout,
                   10)


def test_task_children_hold_no_worker_sockets(one_worker: rpycsvc.Server) -> None:
    with rpycsvc.connect(one_worker.address, output="discard") as c:
        assert c.compute(sockets_a_forked_child_holds) == []
        assert c.compute(sockets_an_exec_child_holds) == []


# -- item 15: a task closing fds 1 and 2 can't corrupt another client's connection ----------


def test_closed_stdout_does_not_lose_the_next_tasks_output(one_worker: rpycsvc.Server) -> None:
    with rpycsvc.connect(one_worker.address, output="capture") as first:
        assert first.compute(close_stdout_and_stderr) == "closed"
        # The (only) worker puts fds 1 and 2 back after that task: the next task's
        # low-level output, another client's, is its output again.
        with rpycsvc.connect(one_worker.address, output="capture") as second:
            fut = second.submit(write_to_fd1, "hello from fd 1\n")
            assert fut.result(timeout=60) == "written"
            wait_until("the fd-1 output", lambda: "hello from fd 1" in fut.stdout, 10)
            assert second.compute(noop, 3) == 3
        assert first.compute(noop, 4) == 4


# -- item 16: finished tasks leave nothing in the deadline schedule --------------------------


def test_finished_tasks_with_long_timeouts_are_not_kept(one_worker: rpycsvc.Server) -> None:
    with rpycsvc.connect(one_worker.address, output="discard") as c:
        before = c.stats()["timeouts_pending"]
        assert before <= 64
        futs = [c.options(timeout=3600).submit(noop, i) for i in range(2000)]
        assert [f.result(timeout=120) for f in futs] == list(range(2000))
        # entries of finished tasks are pruned in bulk: a bound, not zero
        assert c.stats()["timeouts_pending"] <= 64


# -- item 1 (server side): a frozen server's clock doesn't count against its tasks ----------


def tree_of(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_sigstop_does_not_count_against_task_timeouts(server_process: type[ServerProcess],
                                                     tmp_path: Path) -> None:
    srv = server_process("--workers", "2")
    stopped: list[psutil.Process] = []
    go = tmp_path / "go"
    try:
        # (lost_after: the client's own liveness check must not give up on the frozen server)
        with rpycsvc.connect(srv.address, output="discard", lost_after=60) as c:
            futs = [c.options(timeout=5).submit(wait_for_file, str(tmp_path / f"s{i}"),
                                                str(go), i) for i in range(2)]
            for i in range(2):
                wait_until(f"task {i} to start", (tmp_path / f"s{i}").exists)
            try:
                for proc in tree_of(srv.pid):  # the server and its workers, frozen together
                    proc.suspend()
                    stopped.append(proc)
                time.sleep(7)  # longer than the tasks' timeout
            finally:
                for proc in stopped:
                    proc.resume()
            go.write_text("go")
            assert [f.result(timeout=60) for f in futs] == [0, 1]
    finally:
        for proc in stopped:  # (resumed above; again in case the loop above broke)
            try:
                proc.resume()
            except psutil.NoSuchProcess:
                pass


# -- item 5 (pool side): SIGTERM drains: queued tasks are refused as such, running finish ----


def test_sigterm_refuses_queued_tasks_and_lets_running_ones_finish(
        server_process: type[ServerProcess], tmp_path: Path) -> None:
    srv = server_process("--workers", "1", "--grace", "60")
    go = tmp_path / "go"
    with rpycsvc.connect(srv.address, output="discard") as c:
        running = c.submit(wait_for_file, str(tmp_path / "started"), str(go), 42)
        wait_until("the first task to start", (tmp_path / "started").exists)
        queued = c.submit(noop, 1)
        wait_until("the second task to be queued", lambda: c.stats()["tasks_queued"] == 1)
        srv.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ServerDrainingError):
            queued.result(timeout=30)
        with pytest.raises(ServerDrainingError):
            c.submit(noop, 2).result(timeout=30)
        go.write_text("go")
        assert running.result(timeout=30) == 42
    assert srv.proc.wait(timeout=30) == 0


# -- item 6: a task killed for its timeout takes no bystander with it ----------------------


def test_timeout_kill_takes_no_bystander() -> None:
    # One worker; three clients keep it busy with short tasks, a fourth has tasks killed for
    # their timeout: the kill takes the timed-out task only, never a task queued or sent
    # just after it.
    failures: list[BaseException] = []
    done = [0]
    stop = threading.Event()
    with running_server(workers=1) as srv:

        def innocent() -> None:
            with rpycsvc.connect(srv.address, output="discard") as c:
                while not stop.is_set():
                    futs = [c.submit(noop, i) for i in range(8)]
                    for i, f in enumerate(futs):
                        try:
                            assert f.result(timeout=120) == i
                            done[0] += 1
                        except BaseException as exc:  # collected, asserted below
                            failures.append(exc)

        threads = [threading.Thread(target=innocent, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            with rpycsvc.connect(srv.address, output="discard") as guilty:
                for _ in range(12):
                    with pytest.raises(TaskTimeoutError):
                        guilty.options(timeout=0.2).compute(sleep_for, 30)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
    assert done[0] > 0
    assert not failures, f"{len(failures)} of {len(failures) + done[0]} innocent tasks " \
        f"failed: {[repr(f) for f in failures[:5]]}"
