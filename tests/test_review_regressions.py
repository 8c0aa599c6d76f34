"""Regression tests for defects a review found in the reliability work (issue 13), each
reproduced against real servers before it was fixed."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rpycsvc
from rpycsvc.protocol.handshake import server_handshake, versions


def _raise_lost(marker: str) -> None:
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    raise rpycsvc.ServerLostError("the inner server went away")  # as a nested connect raises


def _raise_draining(marker: str) -> None:
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    raise rpycsvc.ServerDrainingError("an inner cluster's server is shutting down")


@pytest.mark.parametrize("task", [_raise_lost, _raise_draining])
def test_a_task_raising_a_server_error_is_its_own_outcome(task, tmp_path: Path) -> None:
    """A task that raises ServerLostError/ServerDrainingError itself (it used rpycsvc to
    reach another server) fails with that error once: it is not re-run, and its server
    keeps getting tasks (it was taken for a draining server before)."""
    marker = tmp_path / "runs"
    with rpycsvc.Cluster.local(2, workers=1, timeout=60) as cluster:
        fut = cluster.submit(task, str(marker))
        with pytest.raises((rpycsvc.ServerLostError, rpycsvc.ServerDrainingError)):
            fut.result(timeout=60)
        assert len(marker.read_text().split()) == 1, "the task was re-run"
        used = {cluster.submit(os.getpid).address for _ in range(2)}
        futs = [cluster.submit(abs, -i) for i in range(20)]
        assert [f.result(timeout=60) for f in futs] == list(range(20))
        assert len({f.address for f in futs} | used) == 2, "a server was dropped"


@pytest.fixture
def silent_after_handshake() -> Iterator[str]:
    """A listener that completes rpycsvc's handshake, then says nothing (a server that
    froze right after accepting)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                continue
            held.append(conn)
            try:
                server_handshake(conn, authkey=None, timeout=10,
                                 server_info={**versions(), "heartbeat": True})
            except Exception:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{lsock.getsockname()[1]}"
    finally:
        stop.set()
        t.join(5)
        lsock.close()
        for c in held:
            c.close()


def test_connect_to_a_server_silent_after_the_handshake_times_out(
        silent_after_handshake: str) -> None:
    """connect(timeout=T) returns an error, never hangs, when the server accepts and
    then says nothing (RPyC's first request during connect had no deadline)."""
    start = time.monotonic()
    with pytest.raises((rpycsvc.ConnectError, rpycsvc.RpycsvcTimeoutError, TimeoutError)):
        rpycsvc.connect(silent_after_handshake, timeout=2, lost_after=2)
    assert time.monotonic() - start < 30, "connect waited far past its timeout"
