"""Cluster reliability (issue 13): closing cancels, a draining server's tasks go elsewhere,
per-task limits vs map deadlines, Cluster.local's stdout, late connections, broadcast and
map_reduce cancel what they give up on, and every lost server keeps its own cause.

All against real servers (subprocesses where a test kills or signals one), public behaviour
only: results, errors, the servers' ``stats()``, files the tasks write, sockets closing.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import rpycsvc
from rpycsvc import Cluster


def _wait_for(what: str, check: Callable[[], bool], bound: float = 30.0) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not true after {bound:g} s")
        time.sleep(0.02)


def _idle(address: str) -> Callable[[], bool]:
    """A check that the server at ``address`` runs and queues nothing (a fresh connection)."""

    def check() -> bool:
        with rpycsvc.connect(address, output="discard") as probe:
            stats = probe.stats()
        return stats["tasks_running"] == 0 and stats["tasks_queued"] == 0

    return check


# -- tasks (module level: the servers import this module to unpickle them) -----------------------
def _note_and_sleep(path: str, seconds: float) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)


def _work(x: int) -> int:
    time.sleep(0.004)
    return x * 3


def _sleep_by_server(seconds_by_server_pid: dict[int, float]) -> int:
    time.sleep(seconds_by_server_pid.get(os.getppid(), 0.0))
    return os.getppid()


def _fail_first_else_sleep(x: int) -> int:
    if x == 0:
        raise ValueError("chunk 0 fails")
    time.sleep(60)
    return x


def _slept(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# -- item 4: close() cancels, never re-dispatches -------------------------------------------------
def test_close_cancels_a_running_task_and_never_reruns_it(server_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "1")
    b = server_process("--workers", "1")
    runs = tmp_path / "runs"
    c = Cluster([a.address, b.address], output="discard")
    try:
        fut = c.submit(_note_and_sleep, str(runs), 60)
        _wait_for("the task started", lambda: runs.exists() and runs.read_text().count("\n") == 1)
    finally:
        c.close()
    with pytest.raises(rpycsvc.TaskCancelledError) as info:
        fut.result(timeout=20)
    assert "closed" in str(info.value)
    # the server stopped it (its connection closed), and no server started it again
    for srv in (a, b):
        _wait_for(f"{srv.address} is idle", _idle(srv.address))
    assert runs.read_text().count("\n") == 1, runs.read_text()


def test_close_fails_queued_tasks_as_cancelled(server_process) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "1")
    c = Cluster([a.address], output="discard")
    try:
        futs = [c.submit(time.sleep, 60) for _ in range(6)]  # 2 in flight, 4 queued here
    finally:
        c.close()
    for f in futs:
        with pytest.raises(rpycsvc.TaskCancelledError):
            f.result(timeout=20)
    with pytest.raises(rpycsvc.RpycsvcError):
        c.submit(abs, 1)


# -- item 5: a SIGTERMed (draining) server's tasks go to the others -------------------------------
def test_sigterm_of_one_server_mid_map_delivers_every_result_in_order(server_process) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "2")
    b = server_process("--workers", "2")
    with Cluster([a.address, b.address], output="discard") as c:
        results = []
        for i, r in enumerate(c.map(_work, range(800))):
            results.append(r)
            if i == 100:
                b.proc.send_signal(signal.SIGTERM)
        assert results == [x * 3 for x in range(800)]
        assert b.proc.wait(timeout=30) == 0  # it shut down gracefully meanwhile
        assert c.submit(os.getppid).result(timeout=30) == a.pid


def test_draining_server_refusals_are_resent_even_with_retries_zero(server_process) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "1")
    b = server_process("--workers", "1", "--grace", "30")
    with Cluster([a.address, b.address], output="discard", retries=0) as c:
        # one long task keeps b draining (grace 30 s) while it refuses what it has queued
        blocker = c.options(timeout=60).submit(time.sleep, 4)
        busy_addr = blocker.address
        busy = b if busy_addr == b.address else a
        other = a if busy is b else b
        _wait_for("the long task runs", lambda: not _idle(busy.address)())
        futs = [c.submit(os.getppid) for _ in range(6)]  # some are queued on `busy`
        busy.proc.send_signal(signal.SIGTERM)
        pids = [f.result(timeout=60) for f in futs]
        assert set(pids) <= {a.pid, b.pid}
        assert blocker.result(timeout=60) is None  # running work finished within the grace
        # new tasks go only to the server that is not shutting down
        assert {c.submit(os.getppid).result(timeout=30) for _ in range(4)} == {other.pid}


@pytest.mark.parametrize("retries", [0, 1])
def test_a_task_cut_off_at_the_end_of_the_grace_counts_as_lost(server_process, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               retries: int) -> None:
    a = server_process("--workers", "1", "--grace", "1")
    b = server_process("--workers", "1", "--grace", "1")
    runs = tmp_path / "runs"
    with Cluster([a.address, b.address], output="discard", retries=retries) as c:
        fut = c.submit(_note_and_sleep, str(runs), 8)
        _wait_for("the task started", lambda: runs.exists() and runs.read_text().count("\n") == 1)
        victim = a if fut.address == a.address else b
        victim.proc.send_signal(signal.SIGTERM)  # grace 1 s: the 8 s task is cut off
        if retries == 0:  # at-most-once: it may have had effects, so it is not run again
            with pytest.raises(rpycsvc.ServerLostError):
                fut.result(timeout=60)
            assert runs.read_text().count("\n") == 1
        else:  # lost like a crashed server's task: run again elsewhere
            assert fut.result(timeout=60) is None
            assert runs.read_text().count("\n") == 2
        assert victim.proc.wait(timeout=30) == 0


# -- item 8: options(timeout=S) is per task, map(timeout=T) is the iteration's deadline ----------
@pytest.fixture(scope="module")
def local2() -> Iterator[Cluster]:
    with Cluster.local(2, workers=1, output="discard") as c:
        yield c


def test_options_timeout_limits_each_task_of_a_map_not_the_whole_map(local2: Cluster) -> None:
    # sixteen 0.5 s tasks on two workers take >= 4 s: more than the 3 s per-task limit
    # (a generous limit for a 0.5 s task on a loaded machine)
    assert list(local2.options(timeout=3).map(_slept, [0.5] * 16)) == [0.5] * 16
    task = local2.task(timeout=3)(_slept)
    assert list(task.map([0.5] * 16)) == [0.5] * 16


def test_a_task_over_its_limit_fails_alone_in_a_map(local2: Cluster) -> None:
    it = local2.options(timeout=3).map(_slept, [0.0, 20.0, 0.0])
    assert next(it) == 0.0
    with pytest.raises(rpycsvc.TaskTimeoutError):
        next(it)


def test_map_timeout_is_the_deadline_of_the_iteration(local2: Cluster) -> None:
    import concurrent.futures

    # each task may run 30 s; the iteration may take 2 s: the deadline comes first
    it = local2.options(timeout=30).map(_slept, [20.0], timeout=2)
    with pytest.raises(rpycsvc.RpycsvcTimeoutError) as info:
        next(it)
    assert not isinstance(info.value, rpycsvc.TaskTimeoutError)
    assert isinstance(info.value, concurrent.futures.TimeoutError)
    it.close()  # type: ignore[attr-defined]


# -- item 17: Cluster.local keeps reading its servers' stdout -------------------------------------
def test_local_server_printing_220_kb_does_not_block(capfd: pytest.CaptureFixture[str]) -> None:
    with Cluster.local(1, workers=1) as c:
        done = threading.Event()
        errors: list[BaseException] = []

        def classic_print() -> None:
            try:
                c[0].execute("print('x' * 220000, flush=True)")
                done.set()
            except BaseException as exc:  # shown below
                errors.append(exc)
                done.set()

        threading.Thread(target=classic_print, daemon=True).start()
        assert done.wait(60), "the server blocked writing to its stdout"
        assert not errors, errors
        assert c[0].eval("1 + 1") == 2
        assert c.submit(abs, -3).result(timeout=30) == 3
        address = c.addresses[0]
        seen = ""

        def forwarded() -> bool:
            nonlocal seen
            captured = capfd.readouterr()
            assert "x" * 1000 not in captured.out  # our stdout is our program's
            seen += captured.err
            return f"[{address}] " + "x" * 220000 in seen

        _wait_for("the server's print reached our stderr, prefixed", forwarded)


# -- item 18: late connections, broadcast, map_reduce, per-server causes --------------------------
class _StallingProxy:
    """Forwards to ``target``; after the first chunk from the server, holds the server's
    bytes back until :meth:`release`. Records when the client closes its side."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.released = threading.Event()
        self.client_closed = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(4)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()  # one connection is all the test makes
        except OSError:
            return
        server = socket.create_connection(self.target, timeout=10)
        server.settimeout(None)
        self._socks += [client, server]
        threading.Thread(target=self._up, args=(client, server), daemon=True).start()
        threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while True:
                data = client.recv(1 << 16)
                if not data:
                    break
                server.sendall(data)
        except OSError:
            pass
        self.client_closed.set()

    def _down(self, server: socket.socket, client: socket.socket) -> None:
        first = True
        try:
            while True:
                data = server.recv(1 << 16)
                if not data:
                    break
                if not first:
                    self.released.wait()
                first = False
                client.sendall(data)
        except OSError:
            pass

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self._listener.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass


def test_a_connection_made_after_the_cluster_gave_up_is_closed(server_process) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "1")
    slow = server_process("--workers", "1")
    proxy = _StallingProxy(slow.port)
    try:
        # the handshake passes, then the server's answers are held: connecting takes longer
        # than the cluster waits (timeout + 5 s), and completes once released
        with Cluster([a.address, proxy.address], timeout=1, output="discard") as c:
            assert list(c.unreachable) == [proxy.address]
            assert isinstance(c.unreachable[proxy.address], TimeoutError)
            # connect() gives up after its own timeout ("did not answer within"), or the
            # cluster's join deadline ("did not finish within") catches it: either way the
            # connection is not left open once the server answers
            assert "did not" in str(c.unreachable[proxy.address])
            proxy.release()
            assert proxy.client_closed.wait(30), "the late connection was left open"
            assert c.submit(abs, -1).result(timeout=30) == 1
    finally:
        proxy.close()


def test_broadcast_waits_once_for_all_and_cancels_what_timed_out(server_process) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "1")
    b = server_process("--workers", "1")
    with Cluster([a.address, b.address], output="discard") as c:
        # a's task runs 60 s, b's 2.5 s; one deadline of 1.5 s for both: both time out
        # (waiting 1.5 s per server in turn would have got b's answer)
        res = c.broadcast(_sleep_by_server, {a.pid: 60.0, b.pid: 2.5}, timeout=1.5)
        assert set(res) == {a.address, b.address}
        for addr, value in res.items():
            assert isinstance(value, rpycsvc.RpycsvcTimeoutError), (addr, value)
        assert res.failed and not res.succeeded
        # the timed-out tasks were cancelled on the servers (a's would run for 60 s)
        _wait_for(f"{a.address} stopped the timed-out task", _idle(a.address))
        assert c.broadcast(_sleep_by_server, {}, timeout=30) == {a.address: a.pid,
                                                                 b.address: b.pid}


def test_map_reduce_cancels_its_other_chunks_when_one_fails(server_process) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "1")
    b = server_process("--workers", "1")
    with Cluster([a.address, b.address], output="discard") as c:
        with pytest.raises(ValueError, match="chunk 0 fails"):
            c.map_reduce(_fail_first_else_sleep, max, range(6), chunksize=1)
        for srv in (a, b):  # the other chunks (60 s each) were stopped, queued ones dropped
            _wait_for(f"{srv.address} is idle", _idle(srv.address))


def test_all_servers_failed_names_each_servers_own_cause(server_process) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "1")
    b = server_process("--workers", "1")
    with Cluster([a.address, b.address], output="discard", reconnect=False) as c:
        futs = [c.submit(time.sleep, 60) for _ in range(4)]
        for srv in (a, b):
            _wait_for(f"{srv.address} runs a task", lambda s=srv: not _idle(s.address)())
        a.kill()
        b.kill()
        errors: list[Any] = [f.exception(timeout=30) for f in futs]
        failed = [e for e in errors if isinstance(e, rpycsvc.AllServersFailedError)]
        assert failed, errors
        for err in failed:
            assert set(err.causes) == {a.address, b.address}
            for addr, cause in err.causes.items():
                assert isinstance(cause, rpycsvc.ConnectError), (addr, cause)
                assert cause.address == addr, (addr, cause)
