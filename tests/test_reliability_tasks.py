"""Regression tests for issue 13's items 2 and 7, which lived in the task path that the
one-path redesign (issue 15) replaced: a stop never waits for the server, and a task runs
with its arguments as they were when ``submit()`` returned. (Items 6 and 15 are in
tests/test_pool_reliability.py.)

Servers run as subprocesses (one worker, so which worker runs what is known), stopped and
resumed in ``finally``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

import rpycsvc
from tests.support.servers import ServerProcess


@pytest.fixture
def one_worker() -> Iterator[ServerProcess]:
    srv = ServerProcess("--workers", "1")
    try:
        yield srv
    finally:
        srv.stop()


def test_cancel_returns_at_once_while_the_server_is_frozen(one_worker: ServerProcess) -> None:
    """Item 2: stopping a running task (``stop()``; ``cancel()`` before issue 17) must never
    block, even when the server doesn't answer (it once looked something up with a
    synchronous round trip first: 8 s for an 8 s freeze). ``lost_after`` is long here, so
    that the liveness check does not end the wait instead."""
    with rpycsvc.connect(one_worker.address, lost_after=60, output="capture") as c:
        assert c.compute(os.getpid) != os.getpid()
        fut = c.submit(time.sleep, 30)
        deadline = time.monotonic() + 30
        while c.stats()["tasks_running"] < 1:  # the task runs on the only worker
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.02)
        root = psutil.Process(one_worker.pid)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            p.suspend()
        try:
            done = threading.Event()
            t = threading.Thread(target=lambda: (fut.stop(), done.set()), daemon=True)
            t.start()
            # Failure case: blocked for as long as the freeze (or until lost_after).
            assert done.wait(10), "stop() still blocked 10 s into the server's freeze"
            with pytest.raises(rpycsvc.TaskCancelledError):
                fut.result(timeout=0)
        finally:
            for p in procs:
                try:
                    p.resume()
                except psutil.NoSuchProcess:
                    pass


def test_a_task_sees_its_arguments_as_they_were_at_submit(one_worker: ServerProcess) -> None:
    """Item 7: a task must run with its arguments as submitted, not as the caller changed
    them after ``submit()`` returned — also when the task waits in the server's queue and
    its worker is killed and replaced meanwhile (here: the only worker is busy with another
    client's task and is killed at that task's timeout). Large buffers travel as views of
    the caller's memory, so they must be written (or copied) before submit() returns."""
    with rpycsvc.connect(one_worker.address, output="capture") as a, \
            rpycsvc.connect(one_worker.address, output="capture") as b:
        assert a.compute(os.getpid) != os.getpid()
        blocker = b.options(timeout=2).submit(time.sleep, 30)  # the only worker runs this
        deadline = time.monotonic() + 30
        while a.stats()["tasks_running"] < 1:
            assert time.monotonic() < deadline, "the blocking task never started"
            time.sleep(0.02)
        buf = bytearray(b"A" * (1 << 20))  # large: sent from the caller's own memory
        fut = a.submit(bytes, buf)
        buf[:] = b"B" * len(buf)
        seen = fut.result(timeout=60)
        with pytest.raises(rpycsvc.TaskTimeoutError):
            blocker.result(timeout=60)
        assert seen[:4] == b"AAAA", f"submitted with b'AAAA', the task saw {seen[:4]!r}"
        assert seen == b"A" * (1 << 20)
