"""Lane internals: deleted with lanes in the one-path redesign.

Lanes (rpycsvc.lane): a client's tasks go straight to a worker process over a second
connection whose socket the server handed to that worker. What users see of the task path
(results, errors, output, stats, timeouts, crashes, stop, concurrency, service-only
refusals, TLS/authkey servers, large data) is tested through public behaviour only, on both
``lanes=True`` and ``lanes=False``, in tests/test_task_path.py. What is left here checks
lane mechanics that have no public equivalent: lane tokens and ids in the handshake, raw
lanes a client does not know of, bytes written straight onto a lane socket, the worker's
lane lock, the pool's lane book. These tests read private lane state
(``client._lane``, ``pool._lanes``, ``Worker.lane_lock``) and go when lanes go.

Lane start/end reach the server from the worker while the client hears from the worker
directly, so server-side bookkeeping is read with :func:`eventually` (a bounded poll).
The functions of this module travel by value (as a script's would), so the workers never
import this module.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any, Callable

import cloudpickle
import pytest

import rpycsvc
from rpycsvc import _wire
from rpycsvc.client import frames_of_call
from rpycsvc.handshake import client_handshake
from rpycsvc.lane import Lane
from rpycsvc.serialization import loads
from tests.support.rendezvous import Gate, pass_gate
from tests.support.servers import running_server

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 30.0
SAMPLE = "tests.support.sample_endpoints"
KEY = "lane key"


# -- fixtures and helpers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server() -> Iterator[rpycsvc.Server]:
    """Two workers and the sample endpoints; tests that kill workers use ``fresh_server``."""
    with running_server(endpoints=[SAMPLE]) as srv:
        yield srv


@pytest.fixture
def lane_client(client: rpycsvc.Client) -> rpycsvc.Client:
    """The conftest client: lanes are on by default."""
    return client


@pytest.fixture
def fresh_server() -> Iterator[rpycsvc.Server]:
    """A server of the test's own (two workers): its worker restarts are the test's alone."""
    with running_server() as srv:
        yield srv


def assert_on_lane(c: rpycsvc.Client, pid: int) -> None:
    """The task that reported ``pid`` ran on ``c``'s (still open) lane."""
    assert c._lane is not None, "no lane was opened"
    assert not c._lane.broken
    assert c._lane.worker_pid == pid, "the task did not run on the lane's worker"


def assert_off_lane(c: rpycsvc.Client) -> None:
    assert c._lane is None


def eventually(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Bounded wait for server-side state that the workers report asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {value!r})")
        time.sleep(0.01)


def settled_stats(c: rpycsvc.Client) -> dict[str, Any]:
    """The server's stats once no task runs (earlier lane tasks' ends have been booked)."""
    def check() -> dict[str, Any] | None:
        stats = c.stats()
        return None if stats["tasks_running"] else stats

    return eventually("no task running", check)


def running(c: rpycsvc.Client) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = loads(c.root.running(), "running tasks")
    return tasks


def with_pid(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn`` and say which process ran it."""
    return fn(*args, **kwargs), os.getpid()


def host_port(srv: rpycsvc.Server) -> tuple[str, int]:
    host, port = srv.address.rsplit(":", 1)
    return host, int(port)


def wait_closed(sock: socket.socket, timeout: float = WAIT) -> None:
    """Bounded wait until the peer has closed ``sock`` (readable: EOF, a reset or a last
    message); nothing is read."""
    ready, _, _ = select.select([sock], [], [], timeout)
    assert ready, "the peer never closed the socket"


def assert_task_killed(conn: socket.socket) -> None:
    """A task held at a Gate died instead of being released: its end of the gate
    connection was closed by the kernel when its process was killed."""
    conn.settimeout(WAIT)
    try:
        assert conn.recv(1) == b""
    except ConnectionResetError:
        pass
    finally:
        conn.close()


# -- the moment between a lane task's reply and its end ---------------------------------------

def reply_then_hold_lane_lock(port: int) -> int:
    """Return at once, but keep the worker from booking the end of this lane task: a thread
    of ours holds the worker's lane lock (at the gate) while the reply goes out. This
    widens, deterministically, the moment between a lane task's reply and its end."""
    import threading

    worker = sys.stdout._worker  # type: ignore[attr-defined]  # the worker's own state

    def hold() -> None:
        with worker.lane_lock:
            pass_gate(port, "holding")

    threading.Thread(target=hold, daemon=True).start()
    deadline = time.monotonic() + WAIT
    while not worker.lane_lock.locked() and time.monotonic() < deadline:
        time.sleep(0.001)
    return os.getpid()


def test_worker_dying_right_after_a_reply(fresh_server: rpycsvc.Server) -> None:
    with rpycsvc.connect(fresh_server.address) as c, Gate() as gate:
        c.compute(int)
        before = settled_stats(c)
        pid = c.compute(reply_then_hold_lane_lock, gate.port)
        assert_on_lane(c, pid)
        gate.arrival()  # the worker has sent the reply, and is stuck before booking the end
        os.kill(pid, signal.SIGKILL)  # (the OOM killer, an operator, a crash in a thread)
        eventually("the killed worker replaced",
                   lambda: c.stats()["worker_restarts"] == before["worker_restarts"] + 1)
        after = c.stats()
        assert (after["tasks_done"] - before["tasks_done"],
                after["tasks_failed"] - before["tasks_failed"]) == (1, 0)
        assert c.compute(abs, -2) == 2  # this task never reached the dead worker


# -- a queued pool task and a lane task racing for one worker ---------------------------------

def test_pool_task_waiting_behind_a_lane_task_is_not_timed_out() -> None:
    """One worker, busy with a pool task; a pool task (timeout 1 s) is queued behind it and a
    lane task waits in the worker's lane socket. When the first ends, the pool sends the
    queued task to the worker at once, but the worker often takes the lane task first
    (the gate shows which). Then the queued task must not time out before it even ran
    (it did once, and the kill was reported to the lane task as a crash)."""
    with running_server(workers=1) as srv, \
            rpycsvc.connect(srv.address, lanes=False) as pool_client, \
            rpycsvc.connect(srv.address) as lane_owner, Gate() as gate:
        lane_owner.compute(int)  # its lane is on the only worker
        for _ in range(30):  # which message the worker reads first is a race: until "lane"
            first = pool_client.submit(pass_gate, gate.port, "first")
            _, first_conn = gate.arrival()  # the worker is busy with a pool task
            queued = pool_client.options(timeout=0.2).submit(pass_gate, gate.port, "queued")
            pool_client.ping()  # requests are handled in order: it is queued now
            on_lane = lane_owner.submit(pass_gate, gate.port, "lane")  # in the lane socket
            gate.release(first_conn)  # the pool sends `queued` to the worker now
            assert first.result(timeout=WAIT) == "first"
            label, conn = gate.arrival()
            if label == "queued":  # the worker took the pool's task first: try again
                gate.release(conn)
                gate.release(gate.arrival()[1])
                assert (queued.result(timeout=WAIT), on_lane.result(timeout=WAIT)) == (
                    "queued", "lane")
                continue
            assert label == "lane"
            try:
                try:
                    err = queued.exception(timeout=0.8)  # 4 x its timeout
                except concurrent.futures.TimeoutError:
                    err = None  # still waiting for the worker: right
                assert err is None, f"the queued task never ran, yet: {err!r}"
                gate.release(conn)
                assert on_lane.result(timeout=WAIT) == "lane"
                gate.release(gate.arrival()[1])
                assert queued.result(timeout=WAIT) == "queued"
            finally:
                conn.close()
            return
        pytest.skip("the worker always took the pool's task first: nothing to show")


# -- lanes off, lane handshakes ---------------------------------------------------------------

def test_server_without_lanes() -> None:
    with running_server(workers=1, lanes=False) as srv, \
            rpycsvc.connect(srv.address) as c:
        assert "lane" not in c.server_info
        assert c.compute(lambda: "works") == "works"
        assert c.submit(abs, -2).result(timeout=WAIT) == 2
        assert_off_lane(c)
        # a hand-made lane with a made-up token is refused
        sock = socket.create_connection(host_port(srv), timeout=WAIT)
        try:
            client_handshake(sock, address=srv.address, authkey=None, timeout=WAIT,
                             extra={"lane": "0" * 32 + "/1"})
            wait_closed(sock)
            assert sock.recv(64) == b""
        finally:
            sock.close()
        assert c.compute(abs, -3) == 3


def test_client_without_lanes(lane_client: rpycsvc.Client, server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address, lanes=False) as c:
        assert c.server_info.get("lane"), "the server would allow one"
        for _ in range(3):
            assert c.compute(abs, -1) == 1
            assert c.submit(abs, -2).result(timeout=WAIT) == 2
        assert_off_lane(c)
        assert c._dial is None


def test_authkey_server_lanes(lane_client: rpycsvc.Client) -> None:
    """With an authkey the lane runs the same challenge: a lane without the key is refused."""
    with running_server(workers=1, authkey=KEY) as srv, \
            rpycsvc.connect(srv.address, authkey=KEY) as c:
        value, pid = c.compute(with_pid, abs, -1)
        assert value == 1
        assert_on_lane(c, pid)
        token = c.server_info["lane"]
        sock = socket.create_connection(host_port(srv), timeout=WAIT)
        try:
            with pytest.raises(rpycsvc.AuthenticationError):
                client_handshake(sock, address=srv.address, authkey=None, timeout=WAIT,
                                 extra={"lane": f"{token}/99"})
        finally:
            sock.close()
        sock = socket.create_connection(host_port(srv), timeout=WAIT)
        try:
            with pytest.raises(rpycsvc.AuthenticationError):
                client_handshake(sock, address=srv.address, authkey="wrong", timeout=WAIT,
                                 extra={"lane": f"{token}/98"})
        finally:
            sock.close()
        assert c.compute(with_pid, abs, -2) == (2, pid)


# -- lane tokens, raw lanes, bytes on a lane socket -------------------------------------------

def test_bogus_lane_token_is_closed(lane_client: rpycsvc.Client, server: rpycsvc.Server) -> None:
    lane_client.compute(int)
    for lane_id in ("bogus/1", "", "/", f"{lane_client.server_info['lane']}x/1"):
        sock = socket.create_connection(host_port(server), timeout=WAIT)
        try:
            client_handshake(sock, address=server.address, authkey=None, timeout=WAIT,
                             extra={"lane": lane_id})
            wait_closed(sock)
            assert sock.recv(64) == b"", f"lane {lane_id!r} was not refused"
        finally:
            sock.close()
    _, pid = lane_client.compute(with_pid, abs, -1)
    assert_on_lane(lane_client, pid)
    with rpycsvc.connect(server.address) as other:
        assert other.compute(abs, -2) == 2


def test_token_of_a_closed_connection_is_refused(server: rpycsvc.Server) -> None:
    c = rpycsvc.connect(server.address)
    c.compute(int)
    token = c.server_info["lane"]
    c.close()

    def refused() -> bool:
        sock = socket.create_connection(host_port(server), timeout=WAIT)
        try:
            client_handshake(sock, address=server.address, authkey=None, timeout=WAIT,
                             extra={"lane": f"{token}/7"})
            sock.settimeout(WAIT)
            try:
                return sock.recv(64) == b""
            except ConnectionResetError:
                return True
        finally:
            sock.close()

    # the server forgets the token when it sees the connection close (asynchronously)
    eventually("the expired token refused", refused)


def test_lane_id_taken_twice_is_refused(lane_client: rpycsvc.Client,
                                        server: rpycsvc.Server) -> None:
    c = lane_client
    c.compute(int)
    lane = c._lane
    assert lane is not None
    sock = socket.create_connection(host_port(server), timeout=WAIT)
    try:
        client_handshake(sock, address=server.address, authkey=None, timeout=WAIT,
                         extra={"lane": lane.id})
        wait_closed(sock)
        assert sock.recv(64) == b""
    finally:
        sock.close()
    _, pid = c.compute(with_pid, int)
    assert c._lane is lane
    assert_on_lane(c, pid)


def _open_raw_lane(c: rpycsvc.Client, srv: rpycsvc.Server, n: int) -> Lane:
    """A second lane of ``c``'s connection, not known to ``c`` (so it outlives ``c``)."""
    return Lane.open(c, lambda: socket.create_connection(host_port(srv), timeout=WAIT),
                     str(c.server_info["lane"]), n, timeout=WAIT)


def test_lane_task_stopped_when_its_connection_closes(fresh_server: rpycsvc.Server) -> None:
    """The RPyC connection that a lane's token came from closes while the lane (still open)
    runs a task: nobody can get its result any more, so the server stops it."""
    with Gate() as gate:
        c = rpycsvc.connect(fresh_server.address)
        raw = _open_raw_lane(c, fresh_server, 1000)
        try:
            kind, spec, frames = frames_of_call(pass_gate, (gate.port, "raw"), {})
            raw.send(1, kind, spec, {"output": True, "key": 1, "label": "raw"}, frames)
            _, raw_conn = gate.arrival()
            held = c.submit(pass_gate, gate.port, "own")  # and one on c's own lane
            _, own_conn = gate.arrival()
            assert c._lane is not None and c._lane.worker_pid != raw.worker_pid
            before = c.stats()["worker_restarts"]
            eventually("both lane tasks booked", lambda: len(running(c)) == 2)
            c.close()
            assert isinstance(held.exception(timeout=WAIT), rpycsvc.ServerLostError)
            assert_task_killed(raw_conn)
            assert_task_killed(own_conn)
            raw.sock.settimeout(WAIT)
            with pytest.raises((EOFError, OSError)):
                _wire.recv_msg(raw.sock)  # no "done": the worker died
        finally:
            raw.close()
            c.close()
    with rpycsvc.connect(fresh_server.address) as d:
        eventually("both workers replaced",
                   lambda: d.stats()["worker_restarts"] == before + 2 and not running(d))
        _, pid = d.compute(with_pid, int)
        assert_on_lane(d, pid)


def test_garbage_on_a_lane_closes_only_that_lane(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address) as c, \
            rpycsvc.connect(server.address) as other:
        _, pid = c.compute(with_pid, int)
        _, other_pid = other.compute(with_pid, int)
        lane, other_lane = c._lane, other._lane
        assert lane is not None and other_lane is not None
        before = c.stats()
        garbage = random.Random(20240611).randbytes(4096)
        # (its header announces some 10^9 frames: the worker gives up on it at once)
        lane.sock.sendall(garbage)
        wait_closed(lane.sock)  # the worker hung up on that lane
        # the server and the other client go on; the worker was not lost
        assert other.compute(with_pid, abs, -1) == (1, other_pid)
        assert other._lane is other_lane
        # the client's next tasks work (a new lane, on a surviving worker)
        assert c.compute(abs, -2) == 2
        value, pid2 = c.compute(with_pid, abs, -3)
        assert value == 3 and c._lane is not lane
        assert_on_lane(c, pid2)
        after = c.stats()
        assert after["worker_restarts"] == before["worker_restarts"]
        assert set(after["worker_pids"]) == set(before["worker_pids"]) >= {pid, other_pid}


def test_next_task_runs_after_the_worker_hung_up_an_idle_lane(
        server: rpycsvc.Server) -> None:
    """The worker closed the lane between tasks, cleanly (EOF, no reset) and with no task
    of it running: the client's next task never reached a worker, so it is sent again
    (once it failed with ServerLostError)."""
    with rpycsvc.connect(server.address) as c:
        c.compute(int)
        lane = c._lane
        assert lane is not None
        # a bare message header announcing 2^32-1 frames: corrupt, so the worker hangs up
        lane.sock.sendall(b"\xff" * _wire._HEAD.size)
        wait_closed(lane.sock, 5.0)  # it read all we sent, then closed the lane (EOF)
        assert c.compute(abs, -2) == 2
        _, pid = c.compute(with_pid, int)
        assert c._lane is not lane
        assert_on_lane(c, pid)


def test_refusal_of_a_malformed_message_is_not_the_next_tasks_error(
        server: rpycsvc.Server) -> None:
    """The worker refuses a message that is no task with a "fail" reply, then hangs up: that
    reply is not the answer to the client's next task (once it was, for a task that never
    ran)."""
    with rpycsvc.connect(server.address) as c:
        c.compute(int)
        lane = c._lane
        assert lane is not None
        _wire.send_msg(lane.sock, ("hello",))  # well framed, but not a task
        wait_closed(lane.sock, 5.0)  # the worker answered "fail" and closed the lane
        assert c.compute(abs, -2) == 2
        fut = c.submit(with_pid, int)  # and through the lane's reader thread
        assert fut.result(timeout=WAIT)[0] == 0
        _, pid = c.compute(with_pid, int)
        assert c._lane is not lane
        assert_on_lane(c, pid)



def test_a_lane_reset_at_once_leaves_no_lane_behind(fresh_server: rpycsvc.Server) -> None:
    """A lane whose client resets it right after the handshake: the worker can't greet
    it and gives it back; the server forgets it (once the worker's message for that case
    was malformed, and the server kept the lane on its books for good)."""
    with rpycsvc.connect(fresh_server.address) as c:
        _, pid = c.compute(with_pid, int)
        token = c.server_info["lane"]
        before = c.stats()["worker_restarts"]
        ids = [f"{token}/{100 + n}" for n in range(5)]
        for lane_id in ids:
            sock = socket.create_connection(host_port(fresh_server), timeout=WAIT)
            try:
                client_handshake(sock, address=fresh_server.address, authkey=None,
                                 timeout=WAIT, extra={"lane": lane_id})
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                sock.close()  # with SO_LINGER 0: a reset, not a goodbye
        eventually("the reset lanes forgotten",
                   lambda: not set(ids) & set(fresh_server.pool._lanes))
        assert c.compute(with_pid, abs, -4) == (4, pid)
        assert c.stats()["worker_restarts"] == before
