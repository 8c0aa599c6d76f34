"""Lane internals: deleted with lanes in the one-path redesign.

Regression tests for the review of lanes (rpycsvc.lane): one test per finding, named by
the reviewer's script (s1 ... s13) in its docstring. The findings whose behaviour users see
(s1, s10, s11, s12, s13, and s3's client side) are tested through public behaviour, on
``lanes=True`` and ``lanes=False``, in tests/test_task_path.py; what is left here reaches a
worker through a lane socket or reads private lane state (raw lanes, hand-made lane
messages, ``pool._lanes``, the worker's lane lock) and has no public equivalent.

Real servers on 127.0.0.1 (port 0), no mocks; every wait is bounded. Helpers and fixtures
come from tests.test_lanes; as there, this module's functions travel to the workers by
value, so the workers never import it.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import rpycsvc
from rpycsvc import _wire
from rpycsvc.client import frames_of_call
from rpycsvc.lane import LaneBroken
from rpycsvc.serialization import dumps
from tests.support.rendezvous import Gate
from tests.support.servers import running_server
from tests.test_lanes import (
    SAMPLE,
    WAIT,
    _open_raw_lane,
    assert_on_lane,
    eventually,
    reply_then_hold_lane_lock,
    running,
    settled_stats,
    wait_closed,
    with_pid,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- helpers (the task-side ones travel by value) ----------------------------------------------

def mark(path: str) -> int:
    with open(path, "a") as f:
        f.write(f"ran in {os.getpid()}\n")
    return os.getpid()


def mark_then_big_reply(path: str) -> bytes:
    """Note that the task ran, shorten the worker's send timeout on this lane (normally
    LANE_IO_TIMEOUT, 120 s) to 0.5 s, and return more than the socket buffers hold."""
    mark(path)
    lane = sys.stdout._worker.current_lane  # type: ignore[attr-defined]
    lane.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 500_000))
    return b"r" * (64 << 20)


def worker_handle(srv: rpycsvc.Server, pid: int) -> Any:
    return next(w for w in srv.runtime.pool._workers if w.proc.pid == pid)


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


def alive(pid: int) -> bool:
    """``pid`` exists and is no zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def one_worker() -> Iterator[rpycsvc.Server]:
    with running_server(workers=1) as srv:
        yield srv


@pytest.fixture
def two_workers() -> Iterator[rpycsvc.Server]:
    with running_server(workers=2) as srv:
        yield srv


# -- s2 ------------------------------------------------------------------------------------------

def test_s2_service_only_worker_refuses_bad_keys() -> None:
    """s2: on a service-only server, a well-framed lane message whose key is a list or an
    int >= 2**63 killed the worker (an exception escaped Worker.serve). Now it is refused
    ("fail"), the lane closes, and no worker restarts."""
    with running_server(workers=2, classic=False, endpoints=[SAMPLE]) as srv, \
            rpycsvc.connect(srv.address, output="discard") as c:
        assert c.compute("add", 1, 2) == 3
        before = settled_stats(c)
        for n, bad_key in enumerate(([1], 2**64), start=100):
            raw = _open_raw_lane(c, srv, n)
            try:
                _wire.send_msg(raw.sock, ("run", bad_key, "endpoint", "add", ()),
                               dumps(((1, 2), {})))
                raw.sock.settimeout(WAIT)
                control, _ = _wire.recv_msg(raw.sock)
                assert control[0] == "fail", control
                assert "key" in str(control[3])
                wait_closed(raw.sock)
                assert raw.sock.recv(64) == b""
                # the worker has gone on to tell the server the lane closed
                eventually("the refused lane dropped",
                           lambda r=raw: r.id not in srv.runtime.pool._lanes)
                assert alive(raw.worker_pid)
            finally:
                raw.close()
        after = c.stats()
        assert after["worker_restarts"] == before["worker_restarts"]
        assert set(after["worker_pids"]) == set(before["worker_pids"])
        assert c.compute("add", 2, 3) == 5


# -- s3 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), "1"], ids=["nan", "str"])
def test_s3_bad_timeouts_refused(one_worker: rpycsvc.Server, bad: Any) -> None:
    """s3: timeout="1" on a lane left an orphan task booked forever; timeout=nan (accepted
    by the client too) killed the pool's deadline thread. Now the client refuses both with
    ConfigError, and the worker refuses a hand-made lane message carrying one."""
    srv = one_worker
    with rpycsvc.connect(srv.address, output="discard") as c, \
            rpycsvc.connect(srv.address, output="discard", lanes=False) as r:
        for client in (c, r):
            with pytest.raises(rpycsvc.ConfigError, match="timeout"):
                client.options(timeout=bad).compute(abs, -1)
        _, pid = c.compute(with_pid, int)
        lane = c._lane
        assert lane is not None and lane.try_acquire()
        try:
            kind, spec, frames = frames_of_call(abs, (-1,), {})
            lane.send(1, kind, spec, {"output": False, "key": 1, "timeout": bad}, frames)
            reply = lane.receive(1)
        finally:
            lane.release()
        assert reply[0] == "error" and "timeout" in reply[2], reply
        stats = settled_stats(c)
        assert stats["tasks_running"] == 0 and not running(c)
        assert stats["worker_restarts"] == 0
        assert r.submit(abs, -2).result(timeout=WAIT) == 2
        assert r.submit(abs, -3).result(timeout=WAIT) == 3
        # timeouts are still enforced (the deadline thread lives)
        with pytest.raises(rpycsvc.TaskTimeoutError):
            r.options(timeout=0.3).compute(time.sleep, 30)
        assert c.compute(abs, -4) == 4
        assert pid != os.getpid()


# -- s4 ------------------------------------------------------------------------------------------

def test_s4_partial_lane_message_does_not_time_out_a_pool_task(
        one_worker: rpycsvc.Server) -> None:
    """s4: a lane client that sent part of a message held its worker's main thread while the
    pool took that worker for idle: it sent it a queued task and timed it out as if it had
    run. Now a worker reading a lane message counts as busy: the task waits in the queue
    (no timeout running) and runs once the partial client is gone."""
    srv = one_worker
    with rpycsvc.connect(srv.address, output="discard") as a, \
            rpycsvc.connect(srv.address, output="discard", lanes=False) as b:
        _, pid = a.compute(with_pid, int)
        assert_on_lane(a, pid)
        lane = a._lane
        assert lane is not None
        w = worker_handle(srv, pid)
        # header: control of 10 bytes, no frames, 1 MiB inline; only 100 bytes follow
        lane.sock.sendall(_wire._HEAD.pack(10, 0, 1 << 20) + b"x" * 100)
        eventually("the worker reading the partial message", lambda: w.running_lane()[0])
        fut = b.options(timeout=1).submit(with_pid, abs, -2)
        # well past its 1 s timeout, had it been sent to the worker
        with pytest.raises(concurrent.futures.TimeoutError):
            fut.result(timeout=2.5)
        stats = b.stats()
        assert (stats["tasks_queued"], stats["tasks_failed"]) == (1, 0)
        lane.close()  # the slow client gives up
        assert fut.result(timeout=WAIT) == (2, pid)
        stats = settled_stats(b)
        assert (stats["tasks_failed"], stats["worker_restarts"]) == (0, 0)


# -- s6 ------------------------------------------------------------------------------------------

def test_s6_task_whose_reply_is_lost_is_not_run_again(two_workers: rpycsvc.Server,
                                                      tmp_path: Path) -> None:
    """s6: when a worker could not send a lane task's reply (the client did not read), the
    lane's fate was LaneClosed ("never ran"), so the client sent the task again through
    RPyC: it ran twice. Now the fate is LaneReplyLost (naming the task), which the client
    takes as "ran": it reports an error and does not re-send."""
    srv = two_workers
    path = tmp_path / "runs"
    with rpycsvc.connect(srv.address, output="discard") as c:
        c.compute(int)
        raw = _open_raw_lane(c, srv, 1000)  # a client that will not read its reply
        try:
            kind, spec, frames = frames_of_call(mark_then_big_reply, (str(path),), {})
            raw.send(7, kind, spec, {"output": False, "key": 7, "label": "big"}, frames)
            # the worker's send gives up after 0.5 s and it hangs up
            fate = eventually("the lane's fate", lambda: c.root.lane_fate(raw.id, 1.0))
            assert fate[0] == "LaneReplyLost", fate
            assert fate[2] == 7
            assert path.read_text().count("\n") == 1
            raw.sock.settimeout(WAIT)
            with pytest.raises(LaneBroken) as info:
                raw.receive(7)  # what was sent, then EOF
            assert info.value.ran, "the client would run the task again"
            assert info.value.fate is not None and info.value.fate[0] == "LaneReplyLost"
        finally:
            raw.close()
        assert path.read_text().count("\n") == 1
        stats = settled_stats(c)
        assert stats["worker_restarts"] == 0
        assert c.compute(abs, -1) == 1


# -- s7 ------------------------------------------------------------------------------------------

def test_s7_finished_lane_task_counted_once_and_not_timed_out(
        two_workers: rpycsvc.Server) -> None:
    """s7: an announced lane task (it has a timeout) counted done, whose timeout fired while
    its reply was on the way, had its worker killed and was counted failed too. Now a
    finished task is neither timed out nor counted twice."""
    srv = two_workers
    with rpycsvc.connect(srv.address, output="discard") as c, Gate() as gate:
        # the lane's worker imports what the task needs now, not within its timeout
        _, pid = c.compute(with_pid, lambda: __import__("tests.support.rendezvous"))
        assert_on_lane(c, pid)
        before = settled_stats(c)
        timeout = 1.0  # ample for the task to return (and count itself) on a loaded machine
        started = time.monotonic()
        assert c.options(timeout=timeout).compute(reply_then_hold_lane_lock, gate.port) == pid
        assert_on_lane(c, pid)
        _, conn = gate.arrival()  # the worker can't book the task's end meanwhile
        # let the task's deadline pass while its end is held back (the scenario itself)
        time.sleep(max(0.0, started + 2 * timeout - time.monotonic()))
        gate.release(conn)
        after = settled_stats(c)
        assert (after["tasks_done"] - before["tasks_done"],
                after["tasks_failed"] - before["tasks_failed"],
                after["worker_restarts"] - before["worker_restarts"]) == (1, 0, 0)
        assert alive(pid) and pid in after["worker_pids"]
        _, pid2 = c.compute(with_pid, int)
        assert pid2 == pid
        assert_on_lane(c, pid)


# -- s8 ------------------------------------------------------------------------------------------

def test_s8_announced_size_costs_no_memory(one_worker: rpycsvc.Server) -> None:
    """s8: a 16-byte lane header made the worker allocate (and zero-fill) the size it
    announced, up to 64 GiB, before a byte arrived. Now announced memory costs nothing
    until the bytes come."""
    srv = one_worker
    with rpycsvc.connect(srv.address, output="discard") as c:
        _, pid = c.compute(with_pid, int)
        lane = c._lane
        assert lane is not None
        w = worker_handle(srv, pid)
        base = rss_mib(pid)
        lane.sock.sendall(_wire._HEAD.pack(10, 0, 3 << 30))  # announce 3 GiB, send nothing
        eventually("the worker reading the message", lambda: w.running_lane()[0])
        peak = base
        deadline = time.monotonic() + 1.5  # a zero-fill of 3 GiB takes about a second
        while time.monotonic() < deadline:
            peak = max(peak, rss_mib(pid))
            time.sleep(0.05)
        assert peak - base < 100, f"worker RSS grew from {base} to {peak} MiB"
        lane.close()
        assert c.compute(abs, -1) == 1
        assert c.stats()["worker_restarts"] == 0


# -- s9 ------------------------------------------------------------------------------------------

def test_s9_idle_lane_closed_with_its_connection(two_workers: rpycsvc.Server) -> None:
    """s9/s13: after its RPyC connection closed, a client's idle lane stayed open and kept
    running tasks for whoever held the socket. Now the server closes it."""
    srv = two_workers
    c = rpycsvc.connect(srv.address, output="discard")
    try:
        c.compute(int)
        raw = _open_raw_lane(c, srv, 1000)  # c does not know it: only the server can close it
    finally:
        c.close()
    try:
        raw.sock.settimeout(5)
        try:
            assert raw.sock.recv(64) == b""
        except ConnectionResetError:
            pass
        eventually("the lane forgotten", lambda: raw.id not in srv.runtime.pool._lanes)
    finally:
        raw.close()
