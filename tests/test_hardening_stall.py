"""One stalled or frozen peer must not stop the server for the others, and a request over
the message limit fails alone (review of issue 13's hardening: findings 2, 5 and 7).

* A peer that stalls in the middle of a message while holding the inbound budget is dropped
  after ``stall_timeout`` seconds of silence, and small messages of everyone else never wait
  for the budget meanwhile; a slow upload that keeps moving is not dropped.
* A client that doesn't read its (large) result doesn't block other clients' results.
* A classic call whose arguments are over ``--max-message-size`` raises
  ``MessageTooLargeError`` naming the limit and its setting; the connection stays up.

Bounds below are failure-case bounds (how long before we call it hung), not speed asserts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import rpyc
from rpyc.core import brine, consts

import rpycsvc
from rpycsvc.errors import MessageTooLargeError
from rpycsvc.protocol.handshake import client_handshake
from tests.support.byvalue import tasks_by_value  # noqa: F401 (an autouse fixture)
from tests.support.limited import closed_by_peer
from tests.support.servers import REPO, ServerProcess, running_server

MiB = 1 << 20
#: How long a call may take before the test calls it hung (machine under load included).
HUNG = 60.0


def _within(fn: Callable[[], Any], bound: float = HUNG) -> Any:
    """``fn()`` run in a thread: its result, or a test failure if it is still blocked after
    ``bound`` seconds (the thread is left behind as a daemon)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(bound)
    if worker.is_alive():
        pytest.fail(f"still blocked after {bound:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _trusted_socket(srv: rpycsvc.Server) -> socket.socket:
    """A raw connection that said a valid rpycsvc hello: trusted with full-size messages."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    client_handshake(sock, address=srv.address, authkey=None, timeout=10)
    return sock


def _ping_frame(data: bytes, seq: int = 1) -> bytes:
    """An RPyC frame with a well-formed HANDLE_PING request echoing ``data``."""
    payload = brine.I1.pack(consts.MSG_REQUEST) + brine.dump(
        (seq, (consts.HANDLE_PING, (consts.LABEL_TUPLE, ((consts.LABEL_VALUE, data),)))))
    return struct.pack("!LB", len(payload), 0) + payload + b"\n"


def _read_frame(sock: socket.socket, timeout: float) -> bytes:
    """The payload of the next frame from ``sock``."""
    sock.settimeout(timeout)

    def exactly(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            piece = sock.recv(n - len(buf))
            if not piece:
                raise EOFError("the server closed the connection")
            buf += piece
        return bytes(buf)

    length, _ = struct.unpack("!LB", exactly(5))
    payload = exactly(length)
    exactly(1)  # the frame's trailing newline
    return payload


def test_peer_stalled_mid_message_holding_the_budget_is_dropped_and_others_go_on() -> None:
    """A peer sends all but one byte of a message that takes the whole inbound budget, then
    stalls. Before: every other client's call through the server and every new connection
    blocked forever. Now small messages don't wait for the budget, and the stalled peer is
    dropped after --stall-timeout, which gives its budget back for large messages."""
    with running_server(workers=1, max_message_size=4 * MiB, inbound_budget=4 * MiB,
                        stall_timeout=2.0) as srv:
        good = rpycsvc.connect(srv.address, output="discard")
        stalled = _trusted_socket(srv)
        try:
            assert _within(lambda: good.compute(abs, -3)) == 3
            n = 4 * MiB - 64
            stalled.sendall(struct.pack("!LB", n, 0) + bytes(n - 1))  # all but one byte
            # another client's compute and classic call, and new connections, still work
            assert _within(lambda: good.compute(abs, -5)) == 5
            assert _within(lambda: good.eval("1 + 1")) == 2

            def fresh_client() -> int:
                with rpycsvc.connect(srv.address, output="discard", timeout=30) as c:
                    return int(c.compute(abs, -7))

            assert _within(fresh_client) == 7

            def fresh_plain_client() -> int:
                conn = rpyc.classic.connect("127.0.0.1", srv.port)
                try:
                    return int(conn.modules.os.getpid())
                finally:
                    conn.close()

            assert _within(fresh_plain_client) == os.getpid()
            # the stalled peer is dropped (after the 2 s bound) ...
            assert closed_by_peer(stalled, HUNG), "the stalled peer was never dropped"
            # ... and its part of the budget is back: a large message gets through
            assert _within(lambda: good.compute(len, bytes(3 * MiB))) == 3 * MiB
        finally:
            stalled.close()
            good.close()


def test_slow_upload_that_keeps_moving_is_not_dropped() -> None:
    """A large message sent in pieces, with pauses shorter than --stall-timeout that add up
    to more than it, is received and answered: only silence counts, not slowness."""
    with running_server(workers=1, max_message_size=4 * MiB, inbound_budget=4 * MiB,
                        stall_timeout=3.0) as srv:
        sock = _trusted_socket(srv)
        try:
            data = os.urandom(2 * MiB)
            frame = _ping_frame(data)
            pieces = 10
            step = len(frame) // pieces + 1
            for i in range(pieces):  # ~5 s in all, never silent for more than ~0.5 s
                sock.sendall(frame[i * step:(i + 1) * step])
                time.sleep(0.5)
            reply = _read_frame(sock, HUNG)
            assert reply[0] == consts.MSG_REPLY, reply[:40]
            assert data in reply
        finally:
            sock.close()


_FROZEN_CLIENT = textwrap.dedent("""
    import sys
    import rpycsvc
    c = rpycsvc.connect(sys.argv[1], output="discard")
    f = c.submit("os:urandom", 64 << 20)
    print("sent", flush=True)
    f.result()
""")


@pytest.mark.timeout(150)
def test_frozen_client_with_a_large_result_does_not_block_other_clients() -> None:
    """Client A (a subprocess, stopped with SIGSTOP) asks for a 64 MiB result; client B's
    computes on the same one-worker server return. Before, the pool's reader thread sent
    A's result itself and blocked in ``sendall`` to the frozen client (and a worker that
    wrote results straight to its client's socket blocked likewise)."""
    with running_server(workers=1) as srv:
        victim = subprocess.Popen(
            [sys.executable, "-c", _FROZEN_CLIENT, srv.address],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert victim.stdout is not None
            assert _within(victim.stdout.readline) == b"sent\n"
            os.kill(victim.pid, signal.SIGSTOP)  # frozen: it never reads its 64 MiB result
            with rpycsvc.connect(srv.address, output="discard") as other:
                # queued behind the victim's task on the one worker: its result is
                # delivered after the victim's, which used to block delivery for everyone
                assert _within(lambda: other.compute(abs, -11)) == 11
                assert _within(lambda: other.compute(abs, -12)) == 12
        finally:
            victim.kill()  # (SIGKILL ends a stopped process too)
            victim.wait(30)


def wait_for_file(path: str) -> int:
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never came")
        time.sleep(0.01)
    return 1


def stop_reader(client: Any, folder: Any, gate: threading.Event) -> Any:
    """Make ``client``'s reader thread wait for ``gate``: in the done-callback of a task
    that ends only once the callback is in place (a task already done when the callback
    is added would run it in this thread instead). Returns that task's future."""
    flag = folder / "reader-stops"
    fut = client.submit(wait_for_file, str(flag))
    fut.add_done_callback(lambda f: gate.wait(HUNG))
    flag.touch()
    return fut


@contextlib.contextmanager
def _a_stuck_client(folder: Path, *server_args: str, output: str = "discard"
                    ) -> Iterator[tuple[Any, Any, Any, int, threading.Event, Any]]:
    """A server (``ServerProcess(*server_args)``) and two clients: ``stuck``, whose reader
    waits for ``gate`` (see stop_reader), and ``other``. Yields ``(stuck, other, server,
    rss_before, gate, first)``: the server's process (psutil), its memory before, and the
    task whose done-callback stops the reader. The gate opens on leaving, at the latest."""
    import psutil

    with ServerProcess(*server_args) as srv, \
            rpycsvc.connect(srv.address, output=output) as stuck, \
            rpycsvc.connect(srv.address, output="discard") as other:
        server = psutil.Process(srv.pid)
        before = server.memory_info().rss
        gate = threading.Event()
        first = stop_reader(stuck, folder, gate)
        try:
            yield stuck, other, server, before, gate, first
        finally:
            gate.set()


def eight_mib(i: int) -> bytes:
    return bytes([i % 256]) * (8 * MiB)


@pytest.mark.timeout(240)
def test_a_client_that_does_not_read_its_results_holds_only_its_own_tasks(
        tmp_path: Path) -> None:
    """A client whose reader thread is stuck (here: in a done-callback) has 100 tasks of
    8 MiB results queued. The server keeps at most about MAX_UNREAD of results nobody reads
    and starts none of that client's queued tasks meanwhile (``clients_not_reading`` in
    ``stats()``); another client's tasks run. Once the client reads again, every result
    arrives. Before, the server kept all 800 MiB (at a few thousand such tasks the kernel's
    OOM killer would have taken the server, and every client with it)."""
    from rpycsvc.server.taskserver import MAX_UNREAD

    with _a_stuck_client(tmp_path, "--workers", "2") as (stuck, other, server, before, gate,
                                                          _):
        try:
            futs = [stuck.submit(eight_mib, i) for i in range(100)]
            deadline = time.monotonic() + HUNG
            while other.stats().get("clients_not_reading") != 1:
                assert time.monotonic() < deadline, "the server never held the stuck client"
                time.sleep(0.05)
            stats = other.stats()
            assert stats["tasks_queued"] > 0  # held, not run into memory nobody reads
            assert other.compute(abs, -5) == 5  # everyone else's tasks go on
            grown = server.memory_info().rss - before
            assert grown < MAX_UNREAD + 160 * MiB, f"the server grew by {grown >> 20} MiB"
        finally:
            gate.set()
        for i, fut in enumerate(futs):
            data = fut.result(timeout=HUNG)
            assert len(data) == 8 * MiB and data[:1] == data[-1:] == bytes([i % 256])
            futs[i] = None  # type: ignore[call-overload]
        assert other.stats()["clients_not_reading"] == 0


_HELD_CLIENT = textwrap.dedent("""\
    import sys, threading, time
    import rpycsvc
    def big(i):
        return bytes([i % 256]) * (32 << 20)
    def wait_for_file(path):
        import os, time
        while not os.path.exists(path):
            time.sleep(0.01)
    c = rpycsvc.connect(sys.argv[1], output="discard")
    gate = threading.Event()
    f = c.submit(wait_for_file, sys.argv[2])
    f.add_done_callback(lambda f: gate.wait(600))  # its reader thread stops here
    open(sys.argv[2], "w").close()
    fs = [c.submit(big, i) for i in range(24)]
    print("submitted", flush=True)
    time.sleep(600)
""")


def _wait_until(what: str, pred: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + HUNG
    while not (got := pred()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return got


@pytest.mark.timeout(240)
def test_a_held_client_that_dies_leaves_no_results_behind(tmp_path: Path) -> None:
    """A client held for not reading (768 MiB of results asked for) is killed: the hold
    goes and the server's memory comes back. Before (review of the hold), the results it
    never read stayed in the server for good: the connection's writer kept a callback that
    kept the connection, and with it ~256 MiB, alive per such client."""
    import psutil

    with ServerProcess("--workers", "2") as srv, \
            rpycsvc.connect(srv.address, output="discard") as other:
        server = psutil.Process(srv.pid)
        base = server.memory_info().rss
        stuck = subprocess.Popen([sys.executable, "-c", _HELD_CLIENT, srv.address,
                                  str(tmp_path / "reader-stops")],
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                 cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert stuck.stdout is not None
            assert _within(stuck.stdout.readline) == b"submitted\n"
            _wait_until("the client was never held",
                        lambda: other.stats().get("clients_not_reading") == 1)
        finally:
            stuck.kill()
            stuck.wait(30)
        _wait_until("the hold outlived its client",
                    lambda: other.stats()["clients_not_reading"] == 0)
        _wait_until(f"the server kept {(server.memory_info().rss - base) >> 20} MiB",
                    lambda: server.memory_info().rss - base < 96 * MiB)
        assert other.compute(abs, -3) == 3


def thread_big(i: int) -> bytes:
    time.sleep(0.05)
    return bytes([i % 256]) * (32 * MiB)


@pytest.mark.timeout(240)
def test_held_thread_tasks_run_once_read_although_their_worker_died(tmp_path: Path) -> None:
    """A held client's queued thread-mode tasks, whose thread worker dies meanwhile (a
    crash, the OOM killer), run once the client reads again. Before (review of the hold):
    the dead worker was not replaced for tasks that were held, and they never ran."""
    with _a_stuck_client(tmp_path, "--workers", "1", "--threads", "2") as (
            stuck, other, _, _, gate, _):
        try:
            futs = [stuck.options(mode="thread").submit(thread_big, i) for i in range(20)]
            _wait_until("the client was never held",
                        lambda: other.stats().get("clients_not_reading") == 1)
            _wait_until("the held client's running tasks did not finish",
                        lambda: other.stats()["tasks_running"] == 0)
            pid = other.stats()["thread_worker_pid"]
            os.kill(pid, signal.SIGKILL)  # (it runs nothing: no task fails for it)
            _wait_until("the thread worker was not replaced",
                        lambda: other.stats()["thread_worker_pid"] not in (None, pid))
        finally:
            gate.set()
        for i, fut in enumerate(futs):
            data = fut.result(timeout=HUNG)
            assert len(data) == 32 * MiB and data[:1] == bytes([i % 256])
            futs[i] = None  # type: ignore[call-overload]


def flood(n: int) -> int:
    line = "x" * (MiB - 1)
    for _ in range(n):
        print(line)
    return n


@pytest.mark.timeout(240)
def test_output_a_client_does_not_read_is_dropped_past_a_bound_and_said_so(
        tmp_path: Path) -> None:
    """A task prints 900 MiB while its client's reader is stuck: the server keeps at most
    about twice MAX_UNREAD of it, drops the rest, and tells the client how much (a line on
    the task's stderr) once it reads again; the result arrives whole. Before, a task
    printing in a loop to such a client filled the server's memory."""
    from rpycsvc.server.taskserver import MAX_UNREAD

    with _a_stuck_client(tmp_path, "--workers", "1", output="capture") as (
            stuck, other, server, before, gate, warm):
        try:
            assert warm.result(timeout=HUNG) == 1
            fut = stuck.submit(flood, 900)
            peak = 0
            deadline = time.monotonic() + HUNG
            while other.stats()["tasks_done"] < 2:  # the flood ended (its output sent or dropped)
                assert time.monotonic() < deadline, "the flood never ended"
                peak = max(peak, server.memory_info().rss - before)
                time.sleep(0.05)
            peak = max(peak, server.memory_info().rss - before)
            assert peak < 2 * MAX_UNREAD + 160 * MiB, f"the server grew by {peak >> 20} MiB"
        finally:
            gate.set()
        assert fut.result(timeout=HUNG) == 900
        assert "characters of this task's output were dropped" in fut.stderr
        assert 0 < len(fut.stdout) < 900 * MiB


def test_classic_call_over_the_message_limit_fails_alone() -> None:
    """A classic call whose arguments are over --max-message-size raises
    MessageTooLargeError naming the limit and its setting; the connection stays up. Before,
    the server dropped the connection (EOFError, or RPyC's "release unlocked lock")."""
    with running_server(workers=1, max_message_size=1 * MiB, inbound_budget=4 * MiB) as srv, \
            rpycsvc.connect(srv.address, output="discard") as c:
        for _ in range(3):
            with pytest.raises(MessageTooLargeError) as caught:
                _within(lambda: c.modules.builtins.len(b"x" * (2 * MiB)))
            assert "1 MiB" in str(caught.value)
            assert "--max-message-size" in str(caught.value)
            assert _within(lambda: c.modules.builtins.len(b"x" * 1000)) == 1000
        assert _within(lambda: c.compute(abs, -4)) == 4
        assert c.lost is None


def test_plain_rpyc_call_over_the_message_limit_fails_alone() -> None:
    """The same for a plain RPyC client (which compresses its frames): it gets an error
    naming the limit (as RPyC's stand-in for an exception class it won't instantiate), and
    its connection stays up."""
    with running_server(workers=1, max_message_size=1 * MiB, inbound_budget=4 * MiB) as srv:
        conn = rpyc.classic.connect("127.0.0.1", srv.port)
        try:
            with pytest.raises(Exception, match="MessageTooLargeError") as caught:
                _within(lambda: conn.modules.builtins.len(os.urandom(2 * MiB)))
            assert "--max-message-size" in str(caught.value)
            assert _within(lambda: conn.modules.builtins.len(b"y" * 1000)) == 1000
        finally:
            conn.close()


def test_heartbeats_survive_connections_closing_under_them() -> None:
    """The server's heartbeat thread ended with "release unlocked lock" when a connection
    closed while it held RPyC's send lock; every client of the server then heard nothing
    and declared it lost. After many clients come and go, one that stays is still alive."""
    with running_server(workers=1) as srv, \
            rpycsvc.connect(srv.address, output="discard", lost_after=3.0) as keeper:
        for _ in range(40):  # (the race is hit in some runs, not all)
            clients = [rpycsvc.connect(srv.address, output="discard", lost_after=0.4)
                       for _ in range(10)]
            for c in clients:
                c.close()
        time.sleep(8.0)  # idle for over 2 x lost_after: only heartbeats keep `keeper` alive
        assert keeper.lost is None, keeper.lost
        assert _within(lambda: keeper.compute(abs, -2)) == 2
