"""Liveness (issue 13, items 1 and 3): a frozen server fails its clients' calls with
ServerLostError after ``lost_after`` seconds of silence, while long classic calls and busy
connections on a healthy server are not mistaken for a freeze.

Servers run as subprocesses so the whole process tree (server and workers) can be frozen
with SIGSTOP; every test sends SIGCONT (and stops the server) in ``finally``.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import psutil
import pytest
import rpyc
from rpyc.core.stream import PipeStream

import rpycsvc
from rpycsvc.client.opening import connect_stream
from tests.support.servers import REPO, ServerProcess

#: A call still blocked this long after the freeze hangs (the failure case), with
#: lost_after=2 it should have failed after about 2 s.
HANG_BOUND = 30.0


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP the process ``pid`` and all its descendants; SIGCONT them on exit."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        p.suspend()
    try:
        yield
    finally:
        for p in procs:
            try:
                p.resume()
            except psutil.NoSuchProcess:
                pass


def outcome(call: Callable[[], Any], bound: float = HANG_BOUND) -> tuple[str, Any]:
    """Run ``call`` in a thread: ``("ok", result)``, ``("raised", exception)``, or
    ``("hung", None)`` if it is still blocked after ``bound`` seconds."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(("ok", call()))
        except BaseException as exc:
            box.append(("raised", exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound)
    if t.is_alive():
        return ("hung", None)
    return box[0]  # type: ignore[no-any-return]


def assert_lost(result: tuple[str, Any]) -> None:
    status, value = result
    assert status != "hung", f"still blocked {HANG_BOUND:g} s after the freeze"
    assert status == "raised", f"expected ServerLostError, got the result {value!r}"
    assert isinstance(value, rpycsvc.ServerLostError), repr(value)
    assert "lost_after=2" in str(value), value  # lost by the liveness check, not otherwise


@pytest.fixture
def proc_server() -> Iterator[ServerProcess]:
    srv = ServerProcess("--workers", "2")
    try:
        yield srv
    finally:
        srv.stop()


# -- a frozen server ------------------------------------------------------------------------

CALLS: dict[str, Callable[[rpycsvc.Client], Any]] = {
    "compute": lambda c: c.compute(time.sleep, 0.2),
    "options(timeout=1).compute": lambda c: c.options(timeout=1).compute(time.sleep, 0.2),
    "submit().result": lambda c: c.submit(time.sleep, 0.2).result(),
    "classic call": lambda c: c.modules.os.getpid(),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_a_call_to_a_frozen_server_fails_with_server_lost(proc_server: ServerProcess,
                                                          call: str) -> None:
    with rpycsvc.connect(proc_server.address, lost_after=2, output="capture") as c:
        assert c.compute(os.getpid) != os.getpid()  # connected, and a task has run
        with frozen(proc_server.pid):
            assert_lost(outcome(lambda: CALLS[call](c)))


def test_calls_in_flight_when_the_server_freezes_fail_with_server_lost(
        proc_server: ServerProcess) -> None:
    with rpycsvc.connect(proc_server.address, lost_after=2, output="capture") as c:
        futures = [c.submit(time.sleep, 30) for _ in range(3)]
        started = threading.Event()
        classic: list[tuple[str, Any]] = []

        def long_classic() -> None:
            started.set()
            classic.append(outcome(lambda: c.modules.time.sleep(30)))

        t = threading.Thread(target=long_classic, daemon=True)
        t.start()
        started.wait(10)
        with frozen(proc_server.pid):
            for fut in futures:
                assert_lost(outcome(lambda f=fut: f.result()))
            t.join(HANG_BOUND + 15)
            assert classic, "the classic call is still blocked"
            assert_lost(classic[0])


def test_on_lost_callbacks_run_when_a_server_freezes(proc_server: ServerProcess) -> None:
    with rpycsvc.connect(proc_server.address, lost_after=2) as c:
        seen: list[BaseException] = []
        fired = threading.Event()
        c.on_lost(lambda client, exc: (seen.append(exc), fired.set()))
        with frozen(proc_server.pid):
            assert fired.wait(HANG_BOUND), "on_lost did not fire"
        assert isinstance(seen[0], rpycsvc.ServerLostError)
        assert "lost_after=2" in str(seen[0])
        assert c.closed
        with pytest.raises(rpycsvc.ServerLostError):
            c.submit(pow, 2, 3)


def test_a_frozen_server_over_pipes_fails_its_calls() -> None:
    """Deployed servers speak over ssh pipes (connect_stream): the same check applies."""
    proc = subprocess.Popen([sys.executable, "-m", "rpycsvc.cli", "serve", "--mode", "stdio",
                             "--workers", "1", "-q"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=str(REPO),
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None and proc.stdin is not None
        c = connect_stream(PipeStream(proc.stdout, proc.stdin), address="stdio",
                           lost_after=2)
        try:
            assert c.compute(pow, 2, 5) == 32
            with frozen(proc.pid):
                assert_lost(outcome(lambda: c.compute(time.sleep, 0.2)))
                assert_lost(outcome(lambda: c.modules.os.getpid()))
        finally:
            c.close()
    finally:
        proc.kill()
        proc.wait(10)


# -- a healthy, busy server is not lost ---------------------------------------------------------


def test_a_long_classic_call_is_not_mistaken_for_a_freeze(proc_server: ServerProcess) -> None:
    """RPyC serves one request at a time per connection: the heartbeat must not wait
    behind this call."""
    with rpycsvc.connect(proc_server.address, lost_after=2) as c:
        assert c.modules.time.sleep(5) is None
        assert not c.closed
        assert c.compute(pow, 2, 10) == 1024


def test_a_busy_connection_is_not_mistaken_for_a_freeze(proc_server: ServerProcess) -> None:
    with rpycsvc.connect(proc_server.address, lost_after=2, output="capture") as c:
        futures = [c.submit(time.sleep, 5) for _ in range(4)]  # 2 workers: 10 s of work
        assert c.compute(time.sleep, 5) is None
        assert [f.result(timeout=60) for f in futures] == [None] * 4
        data = os.urandom(64 << 20)
        assert c.compute(len, data) == len(data)  # a long transfer on the same connection
        assert not c.closed


def test_a_frozen_client_does_not_delay_other_clients_heartbeats(
        proc_server: ServerProcess) -> None:
    """The server's heartbeat thread serves every connection: one whose client stopped
    reading (here, frozen while the server sends it 64 MiB) must not hold it up."""
    script = (
        "import sys, rpycsvc\n"
        f"c = rpycsvc.connect({proc_server.address!r})\n"
        "fut = c.submit(bytes, 64 << 20)\n"
        "print('sent', flush=True)\n"
        "fut.result()\n"
    )
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, cwd=str(REPO),
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == b"sent"
        with frozen(other.pid), rpycsvc.connect(proc_server.address, lost_after=2) as c:
            assert c.modules.time.sleep(5) is None
            assert c.compute(pow, 3, 3) == 27
    finally:
        other.kill()
        other.wait(10)


def test_plain_rpyc_clients_get_no_heartbeat(proc_server: ServerProcess) -> None:
    """Only clients that ask for it in hello get heartbeats; a plain RPyC connection stays
    silent while idle."""
    host, port = proc_server.address.rsplit(":", 1)
    conn = rpyc.connect(host, int(port))
    try:
        assert conn.root.ping(7) == 7
        conn.poll_all(0.5)  # replies to our own last requests (a netref's release)
        readable, _, _ = select.select([conn.fileno()], [], [], 2.5)
        assert readable == [], "the server sent a plain RPyC client something unasked"
    finally:
        conn.close()


def test_lost_after_must_be_positive(proc_server: ServerProcess) -> None:
    for bad in (0, -1, "10", True):
        with pytest.raises(rpycsvc.ConfigError, match="lost_after"):
            rpycsvc.connect(proc_server.address, lost_after=bad)


# -- item 3: classic calls longer than RPyC's 30 s sync_request_timeout ---------------------------


@pytest.mark.slow
def test_classic_calls_may_run_longer_than_30_seconds(proc_server: ServerProcess) -> None:
    """RPyC's default sync_request_timeout (30 s) used to fail these with 'result expired',
    through connect() and through a Cluster's connection alike."""
    address = proc_server.address
    with rpycsvc.connect(address) as c, rpycsvc.Cluster([address]) as cluster:
        results: dict[str, Any] = {}
        threads = [threading.Thread(target=lambda n=n, conn=conn: results.__setitem__(
                       n, outcome(lambda: conn.modules.time.sleep(32), bound=90)))
                   for n, conn in (("connect", c), ("cluster[0]", cluster[0]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert results == {"connect": ("ok", None), "cluster[0]": ("ok", None)}
