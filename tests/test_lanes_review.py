"""Regression tests for the review of lanes (rpycsvc.lane): one test per finding, named by
the reviewer's script (s1 ... s13) in its docstring.

Real servers on 127.0.0.1 (port 0), no mocks; every wait is bounded. Helpers and fixtures
come from tests.test_lanes; as there, this module's functions travel to the workers by
value, so the workers never import it.
"""

from __future__ import annotations

import concurrent.futures
import os
import resource
import signal
import socket
import struct
import sys
import threading
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
from tests.support.rendezvous import Gate, pass_gate
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

def gate_with_pid(port: int) -> str:
    """Wait at the gate, announcing this worker's pid as the label."""
    return pass_gate(port, str(os.getpid()))


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


def hold_many_fds(n: int) -> int:
    """Raise this worker's RLIMIT_NOFILE and open ``n`` descriptors (kept for the worker's
    life): the next lane it receives gets a descriptor above 1023. -1 if the limit can't be
    raised that far."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        return -1
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    sys._review_fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(n)]  # type: ignore[attr-defined]
    return max(sys._review_fds)  # type: ignore[attr-defined]


def print_gate_print_gate(port: int) -> int:
    print("first line", flush=True)
    pass_gate(port, "one")
    print("second line", flush=True)
    pass_gate(port, "two")
    return os.getpid()


def spawn_sleeper(seconds: int) -> tuple[int, int]:
    """Start a process that inherits whatever the worker lets it (close_fds=False)."""
    import subprocess

    child = subprocess.Popen(["sleep", str(seconds)], close_fds=False,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    sys._review_children = [child]  # type: ignore[attr-defined]  # no ResourceWarning
    return child.pid, os.getpid()


def worker_handle(srv: rpycsvc.Server, pid: int) -> Any:
    return next(w for w in srv.runtime.pool._workers if w.proc.pid == pid)


def socket_inodes(pid: int, min_fd: int = 0) -> set[str]:
    """``socket:[inode]`` targets of ``pid``'s descriptors numbered ``min_fd`` or above."""
    found = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        if int(name) < min_fd:
            continue
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


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


# -- s1 ------------------------------------------------------------------------------------------

def test_s1_rpyc_task_not_stuck_behind_a_short_lane_task(two_workers: rpycsvc.Server) -> None:
    """s1 (owner-rule hang): a client's second task, sent through RPyC while its first runs
    on its lane (short: never announced), ran only once an unrelated long task on the other
    worker ended. Now it runs on the lane's worker as soon as that is free."""
    srv = two_workers
    with rpycsvc.connect(srv.address, lanes=False) as d, Gate() as gate:
        held = d.submit(gate_with_pid, gate.port)  # holds one worker
        busy_pid, conn = gate.arrival()
        with rpycsvc.connect(srv.address, output="discard") as c:
            _, lane_pid = c.compute(with_pid, int)  # the lane goes to the idle worker
            assert_on_lane(c, lane_pid)
            assert str(lane_pid) != busy_pid
            for _ in range(5):
                f1 = c.submit(with_pid, time.sleep, 0.02)  # on the lane; under 50 ms
                f2 = c.submit(with_pid, abs, -2)  # the lane is taken: through RPyC
                assert f1.result(timeout=WAIT) == (None, lane_pid)
                # the other worker is still held at the gate
                assert f2.result(timeout=5) == (2, lane_pid)
            assert not held.done()
        gate.release(conn)
        assert held.result(timeout=WAIT) == busy_pid


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


# -- s9 / s13 ------------------------------------------------------------------------------------

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


# -- s10 -----------------------------------------------------------------------------------------

def test_s10_flusher_works_with_a_lane_fd_above_1023(one_worker: rpycsvc.Server) -> None:
    """s10: the worker's flusher used select.select(), which raises ValueError for a
    descriptor >= 1024; the flusher thread died for good (no more output, lane-start or
    lane moves). Now it uses poll() and survives errors: output keeps coming."""
    srv = one_worker
    with rpycsvc.connect(srv.address, output="capture") as c, Gate() as gate:
        _, pid = c.compute(with_pid, int)
        top = c.compute(hold_many_fds, 1100)
        if top < 0:
            pytest.skip("RLIMIT_NOFILE's hard limit is too low for a descriptor above 1023")
        raw = _open_raw_lane(c, srv, 1000)  # idle, registered in the worker's selector
        try:
            assert max(int(n) for n in os.listdir(f"/proc/{pid}/fd")) >= 1024
            lane_fds = [int(n) for n in os.listdir(f"/proc/{pid}/fd") if int(n) > top
                        and os.readlink(f"/proc/{pid}/fd/{n}").startswith("socket:")]
            assert lane_fds and min(lane_fds) >= 1024, "the raw lane got no high descriptor"
            fut = c.submit(print_gate_print_gate, gate.port)  # busy: the flusher polls lanes
            _, conn = gate.arrival()
            eventually("the first line while the task waits",
                       lambda: fut.stdout == "first line\n", timeout=5)
            # several flusher ticks (50 ms) with the high descriptor among the lanes
            time.sleep(0.3)
            gate.release(conn)
            _, conn = gate.arrival()
            eventually("the second line while the task waits",
                       lambda: fut.stdout == "first line\nsecond line\n", timeout=5)
            gate.release(conn)
            assert fut.result(timeout=WAIT) == pid
            assert_on_lane(c, pid)
            # and the high-descriptor lane serves tasks
            kind, spec, frames = frames_of_call(with_pid, (abs, -3), {})
            raw.send(1, kind, spec, {"output": False, "key": 1}, frames)
            raw.sock.settimeout(WAIT)
            reply = raw.receive(1)
            assert reply[0] == "ok"
        finally:
            raw.close()


# -- s11 -----------------------------------------------------------------------------------------

def test_s11_lane_task_during_graceful_shutdown_is_cancelled(
        two_workers: rpycsvc.Server) -> None:
    """s11: during a graceful shutdown the RPyC path refused new tasks but lanes took them,
    unbooked, and they were killed as if out of memory. Now a new task on a lane gets
    TaskCancelledError "shutting down", like on the RPyC path."""
    srv = two_workers
    with rpycsvc.connect(srv.address, output="discard", lanes=False) as other, \
            rpycsvc.connect(srv.address, output="discard") as c, \
            rpycsvc.connect(srv.address, output="discard", lanes=False) as r, Gate() as gate:
        _, pid = c.compute(with_pid, int)
        lane = c._lane
        assert_on_lane(c, pid)
        held = other.submit(pass_gate, gate.port, "long")  # keeps the grace period open
        _, conn = gate.arrival()
        closer = threading.Thread(target=srv.close, kwargs={"grace": 20}, daemon=True)
        closer.start()
        try:
            assert lane is not None
            # the server closes the idle lane at once, not at the end of the grace period
            # (the bug: lanes took tasks until then; the held task keeps it open for 30 s)
            wait_closed(lane.sock, 5.0)
            with pytest.raises(rpycsvc.TaskCancelledError, match="shutting down"):
                r.submit(abs, -1).result(timeout=WAIT)
            with pytest.raises(rpycsvc.TaskCancelledError, match="shutting down"):
                c.submit(abs, -1).result(timeout=WAIT)
            with pytest.raises(rpycsvc.TaskCancelledError, match="shutting down"):
                c.compute(abs, -1)
            assert not held.done()
        finally:
            gate.release(conn)
        assert held.result(timeout=WAIT) == "long"  # the running task had its grace
        closer.join(WAIT)
        assert not closer.is_alive()


# -- s12 -----------------------------------------------------------------------------------------

def test_s12_lane_task_cancelled_before_it_starts_never_runs(one_worker: rpycsvc.Server,
                                                             tmp_path: Path) -> None:
    """s12: cancelling a lane task its worker had not started yet returned True, yet the
    task ran later anyway (or was killed with its worker). Now the worker refuses it."""
    srv = one_worker
    path = tmp_path / "ran"
    with rpycsvc.connect(srv.address, output="discard") as c, \
            rpycsvc.connect(srv.address, output="discard", lanes=False) as d, Gate() as gate:
        _, pid = c.compute(with_pid, int)  # c's lane is on the only worker
        lane = c._lane
        before = settled_stats(c)
        held = d.submit(pass_gate, gate.port, "busy")
        _, conn = gate.arrival()  # the worker is busy
        fut = c.submit(mark, str(path))  # waits, unread, in the lane
        assert lane is not None and lane.key is not None, "the task did not take the lane"
        assert fut.stop()  # (sent: running, so stop(), not the stdlib's cancel())
        with pytest.raises(rpycsvc.TaskCancelledError):
            fut.result(timeout=0)
        # The cancel goes to the server asynchronously, like on the RPyC path; requests on
        # one connection are handled in order, so once this round trip is back, the server
        # has told the worker (before the worker is free to read the lane).
        c.ping()
        gate.release(conn)
        assert held.result(timeout=WAIT) == "busy"
        # the lane is free again once the worker answered the cancelled task
        eventually("the lane released", lane.try_acquire)
        lane.release()
        # a task after it on the same lane: the worker has read the cancelled one
        assert c.compute(with_pid, int) == (0, pid)
        assert c._lane is lane
        assert not path.exists(), "the cancelled task ran"
        after = settled_stats(c)
        assert after["worker_restarts"] == before["worker_restarts"]
        assert not path.exists()


# -- s13 -----------------------------------------------------------------------------------------

def test_s13_task_children_hold_no_lane_socket(one_worker: rpycsvc.Server) -> None:
    """s13: lane sockets received over SCM_RIGHTS were inheritable: a process a task
    started (Popen(close_fds=False), os.system) held every lane of the worker, so clients
    saw no EOF when the worker died. Now the child holds none of the worker's sockets."""
    srv = one_worker
    with rpycsvc.connect(srv.address, output="discard") as a, \
            rpycsvc.connect(srv.address, output="discard") as b:
        _, pid = a.compute(with_pid, int)
        _, pid_b = b.compute(with_pid, int)
        assert pid == pid_b  # two lanes on the one worker
        child, worker = a.compute(spawn_sleeper, 20)
        assert worker == pid
        try:
            worker_sockets = socket_inodes(pid)
            assert len(worker_sockets) >= 3  # its server channel and two lanes
            leaked = socket_inodes(child, min_fd=3) & worker_sockets
            assert not leaked, f"the task's child holds the worker's sockets {leaked}"
            # so when the worker dies, b's lane sees EOF at once
            assert b._lane is not None
            os.kill(pid, signal.SIGKILL)
            b._lane.sock.settimeout(5)
            try:
                assert b._lane.sock.recv(1) == b""
            except ConnectionResetError:
                pass
        finally:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
