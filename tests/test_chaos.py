"""Chaos (issue 13, "Done means"): three servers, a 1,000-task map; mid-map one server's
whole process tree is frozen (SIGSTOP) and another is shut down (SIGTERM). Every result
arrives, in order, none lost; the map returns while the frozen server is still stopped.

The frozen server is resumed only after the map returns, or by a watchdog after
``FREEZE_BOUND`` seconds (the failure case: the map waited for the frozen server).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from rpycsvc import Cluster

#: The failure case: if the map has not returned this long after the freeze, resume the
#: frozen server (so nothing hangs for ever) and fail.
FREEZE_BOUND = 120.0


def _task(x: int) -> int:
    time.sleep(0.003)
    return x * 7 + 1


def _freeze(pid: int) -> list[psutil.Process]:
    """SIGSTOP ``pid`` and every descendant (server first: it can't react meanwhile)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        p.suspend()
    return procs


def _thaw(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.resume()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
@pytest.mark.timeout(FREEZE_BOUND + 120)
# A client thread that dies (e.g. a reconnect that met a server shutting down) is a failure.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_map_survives_a_frozen_and_a_sigtermed_server(server_process) -> None:  # type: ignore[no-untyped-def]
    servers = [server_process("--workers", "2") for _ in range(3)]
    frozen_srv, drained_srv, healthy = servers
    frozen: list[psutil.Process] = []
    thawed_early = threading.Event()
    lock = threading.Lock()

    def watchdog() -> None:  # the failure case only
        with lock:
            if frozen:
                thawed_early.set()
                _thaw(frozen)

    timer = threading.Timer(FREEZE_BOUND, watchdog)
    timer.daemon = True
    try:
        with Cluster([s.address for s in servers], output="discard", lost_after=2.0) as c:
            n = 1000
            results = []
            for i, r in enumerate(c.map(_task, range(n))):
                results.append(r)
                if i == 150:
                    with lock:
                        frozen.extend(_freeze(frozen_srv.pid))
                    timer.start()
                elif i == 300:
                    drained_srv.proc.send_signal(signal.SIGTERM)
            # the map returned: was the frozen server still stopped?
            still_stopped = all(p.status() == psutil.STATUS_STOPPED for p in frozen)
            with lock:
                _thaw(frozen)
                frozen.clear()
            timer.cancel()
            assert not thawed_early.is_set(), (
                f"the map waited for the frozen server ({FREEZE_BOUND:g} s watchdog fired)")
            assert still_stopped
            assert len(results) == n
            assert results == [x * 7 + 1 for x in range(n)]
            assert drained_srv.proc.wait(timeout=60) == 0  # shut down gracefully meanwhile
            # the healthy server still serves
            assert c.submit(os.getppid).result(timeout=30) in {healthy.pid, frozen_srv.pid}
    finally:
        timer.cancel()
        with lock:
            _thaw(frozen)
            frozen.clear()
