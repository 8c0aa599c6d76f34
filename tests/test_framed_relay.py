"""The lean relay: small task messages cross the server without being framed again.

In: a small ``run`` (all its frames inline) goes to the worker as the client's inline
block, unpacked only there. Out: a worker frames a small result's whole client-facing
``done`` task message itself (:func:`rpycsvc.protocol.taskframes.framed_reply`); the
server books the task and writes those bytes to the client without unpickling or
framing anything. These tests check that this changes nothing a client can see: the
bytes are exactly those the server would have framed from what the worker channel
delivers (same read-only flags, so ``bytes`` stay ``bytes`` and arrays keep their
writability); arguments and results, exceptions, output before its result, and the
server's message limit for results behave as before, on TCP and over a stdio server's
pipes (a deployed server's transport).
"""

from __future__ import annotations

import pickle
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import rpycsvc
from rpycsvc.protocol.serialization import dumps
from rpycsvc.protocol.taskframes import TaskMessage, framed_reply
from rpycsvc.server import wire
from tests.support.byvalue import tasks_by_value  # noqa: F401
from tests.support.servers import ServerProcess
from tests.test_taskframes import StdioServer

WAIT = 60.0


def _relayed(frames: Any) -> list[Any]:
    """``frames`` after a trip over a real worker channel (a socketpair)."""
    a, b = socket.socketpair()
    try:
        wire.send_msg(a, ("done", 1, True, 0.5), frames)
        _, got = wire.Reader(b).recv_msg()
        return got
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("value", [
    None, 7, "text", b"\x00" * 100, bytearray(b"ab") * 300,
    np.arange(1000), np.frombuffer(b"abcdefgh", dtype=np.uint8),
    [np.ones(10), b"xy", np.zeros(3, dtype=np.int8)],
], ids=["none", "int", "str", "bytes", "bytearray", "array", "readonly-array", "mixed"])
def test_the_worker_frames_exactly_what_the_server_would(value: Any) -> None:
    """For results of every kind of frame (bytes, writable and read-only out-of-band
    buffers), the worker's framing equals the server's framing of the relayed frames."""
    out = dumps(value, "result", copy=False)
    control = ("done", 42, "ok", 0.25)
    head = framed_reply(control, out)
    assert head is not None
    assert head == TaskMessage(control, _relayed(out)).head


def test_a_large_result_is_not_framed_by_the_worker() -> None:
    """A result of 64 KiB or more goes the old way (its frames are written from their
    buffers, never joined into one message)."""
    assert framed_reply(("done", 1, "ok", 0.0), dumps(np.zeros(1 << 14), copy=False)) is None


def _shout(x: int) -> int:
    print("before", x)
    return x * 2


def _fail() -> None:
    raise KeyError("nope")


@pytest.fixture(params=["tcp", "stdio"])
def relay_client(request: pytest.FixtureRequest) -> Iterator[rpycsvc.Client]:
    """A client of a 1-worker server over TCP, or of a stdio server over its pipes."""
    if request.param == "tcp":
        server = request.getfixturevalue("server")
        with rpycsvc.connect(server.address, output="capture") as c:
            yield c
        return
    srv = StdioServer("--workers", "1")
    try:
        c = srv.connect(output="capture")
        try:
            yield c
        finally:
            c.close()
    finally:
        srv.stop()


@pytest.mark.timeout(300)
def test_results_errors_and_output_through_the_relay(relay_client: rpycsvc.Client) -> None:
    """Each kind of small result arrives as before; a task's output is complete when its
    framed result arrives; an exception is still relayed (not framed by the worker)."""
    c = relay_client
    before = c.stats()
    fut = c.submit(_shout, 21)
    assert fut.result(timeout=WAIT) == 42
    assert fut.stdout == "before 21\n"
    back = c.submit(np.arange, 100).result(timeout=WAIT)
    assert back.flags.writeable and back.sum() == 4950
    ro = c.submit(np.frombuffer, b"abcdefgh", dtype=np.uint8).result(timeout=WAIT)
    assert bytes(ro) == b"abcdefgh"
    raw = c.submit(bytes, 5000).result(timeout=WAIT)
    assert type(raw) is bytes and raw == bytes(5000)
    assert c.options(mode="thread").submit(_shout, 3).result(timeout=WAIT) == 6
    with pytest.raises(KeyError, match="nope"):
        c.submit(_fail).result(timeout=WAIT)
    futures = [c.submit(_shout, i) for i in range(200)]
    assert [f.result(timeout=WAIT) for f in futures] == [2 * i for i in range(200)]
    assert [f.stdout for f in futures] == [f"before {i}\n" for i in range(200)]
    after = c.stats()
    assert after["tasks_done"] - before["tasks_done"] == 205
    assert after["tasks_failed"] - before["tasks_failed"] == 1


@pytest.mark.timeout(300)
def test_a_framed_result_over_the_servers_limit_fails_alone(
        server_process: type[ServerProcess]) -> None:
    """Under --max-message-size 100000 (of which 64 KiB are kept for framing) a 40,000-byte
    result is small enough for the worker to frame, yet over the limit for results: that
    task fails alone with MessageTooLargeError naming the setting; the next one works."""
    srv = server_process("--max-message-size", "100000", "--workers", "1")
    with rpycsvc.connect(srv.address, output="discard") as c:
        with pytest.raises(rpycsvc.MessageTooLargeError, match="--max-message-size"):
            c.submit(bytes, 40_000).result(timeout=WAIT)
        assert c.submit(bytes, 1_000).result(timeout=WAIT) == bytes(1_000)
        assert pickle.loads(pickle.dumps(c.compute(len, b"abc"))) == 3


def _kind_of(a: Any) -> tuple[str, Any]:
    return type(a).__name__, getattr(getattr(a, "flags", None), "writeable", None)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["process", "thread"])
def test_arguments_through_the_forwarded_block(server: rpycsvc.Server, mode: str) -> None:
    """Small arguments, forwarded to the worker in the client's own block, arrive as
    before: equal, of the same type, a writable array writable, a read-only one read-only."""
    with rpycsvc.connect(server.address, output="discard", mode=mode) as c:
        assert c.submit(_kind_of, np.arange(10)).result(timeout=WAIT) == ("ndarray", True)
        ro = np.frombuffer(b"abcdefgh", dtype=np.uint8)
        assert c.submit(_kind_of, ro).result(timeout=WAIT) == ("ndarray", False)
        assert c.submit(_kind_of, b"xyz").result(timeout=WAIT) == ("bytes", None)
        assert c.submit(_kind_of, bytearray(b"ab")).result(timeout=WAIT) == ("bytearray", None)
        assert c.submit(len, b"x" * 50_000).result(timeout=WAIT) == 50_000
        assert c.submit(np.sum, np.arange(100_000)).result(timeout=WAIT) == 4999950000
        assert c.submit(sorted, [3, 1, 2], reverse=True).result(timeout=WAIT) == [3, 2, 1]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_client_that_stops_reading_does_not_hold_up_others(mode: str) -> None:
    """Results to a client that reads nothing pile up for that client alone. A non-blocking
    send that got only a part of a result out must not finish it blocking in the thread
    that relays a worker's results: every other client of that worker would wait too.
    (Found in review: on the first lean relay, the second client's task never returned.)"""
    block = threading.Event()
    with ServerProcess("--workers", "2") as srv:
        c1 = rpycsvc.connect(srv.address, output="discard", mode=mode)
        c2 = rpycsvc.connect(srv.address, output="discard", mode=mode)
        try:
            first = c1.submit(bytes, 10)
            first.add_done_callback(lambda f: block.wait(WAIT * 3))  # c1's reader stops
            wait_until(first.done)
            futs = [c1.submit(bytes, 3000) for _ in range(6000)]  # ~18 MB, unread
            # the server runs them all; their results wait for c1 (not the worker's relay)
            wait_until(lambda: _idle(c2.stats()))
            assert c2.submit(len, b"abc").result(timeout=WAIT) == 3
        finally:
            block.set()
            c2.close()
            c1.close()
        assert all(f.done() for f in futs)


def _idle(stats: dict[str, Any]) -> bool:
    return stats["tasks_running"] == 0 and stats["tasks_queued"] == 0


def wait_until(cond: Any) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.05)
