"""A few bytes can't cost the server gigabytes, and nothing a client sends or fails to send
locks others out (issue 13, items 9-12).

The attacked servers run as child processes under ``RLIMIT_AS`` (1 GiB) or ``RLIMIT_NOFILE``
(see :mod:`tests.support.limited`): an attack that works shows as a ``MemoryError`` in the
server's log, a dead server or a refused client, never as a machine out of memory.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rpyc.core import brine, consts

import rpycsvc
from rpycsvc.protocol.handshake import client_handshake
from tests.support.limited import REPO, LimitedServer, closed_by_peer, free_port, metric
from tests.support.servers import running_server

GiB = 1 << 30
MiB = 1 << 20
KEY = "correct horse battery staple"
#: Under the old 1 GiB frame limit and the new 2 GiB default: the old server allocated it.
BOMB_LENGTH = GiB - 16
#: The memo-index bomb: PROTO 5, NONE, LONG_BINPUT 0x7fffffff, STOP (9 bytes). Loading it
#: made the C unpickler allocate 16 bytes per index: 32 GiB.
MEMO_BOMB = b"\x80\x05Nr" + (0x7FFFFFFF).to_bytes(4, "little") + b"."
SERVICE_ONLY = ("--workers", "1", "--no-classic",
                "--endpoints", "tests.support.sample_endpoints")


def _header(length: int, compressed: int = 0) -> bytes:
    return struct.pack("!LB", length, compressed)


def _frame(payload: bytes, compressed: int = 0) -> bytes:
    return _header(len(payload), compressed) + payload + b"\n"


def _ping_request(seq: int = 1) -> bytes:
    """A well-formed RPyC request (HANDLE_PING), as a plain RPyC client sends it."""
    return brine.I1.pack(consts.MSG_REQUEST) + brine.dump((seq, (consts.HANDLE_PING, (b"hi",))))


@functools.cache
def _zeros_deflated(total: int) -> bytes:
    """``total`` zero bytes, zlib-compressed, made a MiB at a time (about total/1000 bytes)."""
    packer = zlib.compressobj(6)
    block = bytes(MiB)
    parts = [packer.compress(block[:min(MiB, total - done)]) for done in range(0, total, MiB)]
    return b"".join(parts) + packer.flush()


def _dial(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _dial_hello(srv: LimitedServer) -> socket.socket:
    """A connection that said a valid rpycsvc hello (all a server without authkey asks)."""
    sock = _dial(srv.port)
    client_handshake(sock, address=srv.address, authkey=None, timeout=10)
    return sock


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


@pytest.fixture(scope="module")
def bombed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitedServer]:
    """A service-only server without authkey, default limits, under a 1 GiB address space."""
    log = tmp_path_factory.mktemp("bombed") / "server.log"
    with LimitedServer(*SERVICE_ONLY, "--handshake-timeout", "30", logfile=log,
                       address_space=GiB) as srv:
        yield srv


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitedServer]:
    """The same with --max-message-size 64M --inbound-budget 128M."""
    log = tmp_path_factory.mktemp("tight") / "server.log"
    with LimitedServer(*SERVICE_ONLY, "--max-message-size", "64M", "--inbound-budget", "128M",
                       logfile=log, address_space=GiB) as srv:
        yield srv


def _still_serves(srv: LimitedServer, rss_before: int, margin: int = 64 * MiB) -> None:
    """The server is alive, serves a real client, logged no MemoryError, and its memory
    grew by less than ``margin``."""
    with rpycsvc.connect(srv.address, output="discard") as c:
        assert c.compute("add", 2, 3) == 5
    assert srv.alive()
    log = srv.log()
    assert "MemoryError" not in log, log[-4000:]
    assert srv.rss() < rss_before + margin


# -- item 9: memory bombs ----------------------------------------------------------------------


def test_frame_headers_allocate_nothing(bombed: LimitedServer) -> None:
    """Three 5-byte headers announcing ~1 GiB each cost the old server 3 GiB. Now: a peer
    that hasn't said hello is dropped at once; one that has gets memory as bytes arrive."""
    before = bombed.rss()
    strangers = [_dial(bombed.port) for _ in range(3)]
    talkers = [_dial_hello(bombed) for _ in range(3)]
    try:
        for s in strangers + talkers:
            s.sendall(_header(BOMB_LENGTH))
        for s in strangers:
            assert closed_by_peer(s, 15), "a frame over the pre-authentication cap was accepted"
        bombed.wait_log("before authenticating")
        _still_serves(bombed, before)
        for s in talkers:  # announced, sent nothing: still waiting for their bytes
            assert not closed_by_peer(s, 0.1)
    finally:
        _close_all(strangers + talkers)
    _still_serves(bombed, before)


def test_compressed_bomb_before_hello_is_refused(bombed: LimitedServer) -> None:
    """1 MB of deflated zeros (1 GiB inflated) from a peer that hasn't said hello: 2.2 GB
    of the old server's memory; now over the 64 KiB cap before anything is inflated. A small
    frame under the cap that inflates far past it stops at the cap."""
    before = bombed.rss()
    big = _zeros_deflated(GiB)
    small = _zeros_deflated(32 * MiB)
    assert len(small) < 64 * 1024 < len(big)
    for bomb in (big, small):
        with _dial(bombed.port) as s:
            s.sendall(_frame(bomb, compressed=1))
            assert closed_by_peer(s, 30)
    bombed.wait_log("inflates past")
    _still_serves(bombed, before)


def test_compressed_bomb_after_hello_stops_at_the_limit(tight: LimitedServer) -> None:
    """After hello, a compressed frame inflates only up to --max-message-size (64M here)."""
    before = tight.rss()
    with _dial_hello(tight) as s:
        s.sendall(_frame(_zeros_deflated(GiB), compressed=1))
        assert closed_by_peer(s, 60)
    tight.wait_log("inflates past 67108864 bytes")
    _still_serves(tight, before, margin=160 * MiB)  # (what was inflated may stay mapped)


def test_memo_index_bomb_is_refused(bombed: LimitedServer) -> None:
    """The 9-byte pickle passed the service-only check while the check itself allocated
    gigabytes. Now it is refused for what it is, and the server keeps serving."""
    before = bombed.rss()
    replies: concurrent.futures.Future[tuple[str, Any]] = concurrent.futures.Future()
    with rpycsvc.connect(bombed.address, output="discard") as c:
        # the task's argument frame is the bomb itself (frames_of_call would pickle properly)
        c.start_task("endpoint", "add", {}, (MEMO_BOMB,),
                     lambda status, reply: replies.set_result((status, reply)))
        status, reply = replies.result(timeout=60)
        assert status == "reply", (status, reply)
        assert c.compute("add", 1, 2) == 3  # the connection stayed up
    assert reply[0] == "error" and reply[1] == "SerializationError", reply
    assert "memo" in reply[2], reply
    _still_serves(bombed, before)


def test_plain_pickle_checks_are_bounded(tmp_path: Path) -> None:
    """check_plain and loads_plain (the server's check of a service-only
    task's arguments, and a worker's) refuse the memo
    bomb without allocating: run in a child under a 1 GiB address space."""
    code = (
        "from rpycsvc.protocol.serialization import check_plain, loads_plain\n"
        "from rpycsvc.errors import SerializationError\n"
        f"bomb = {MEMO_BOMB!r}\n"
        "for check in (lambda: check_plain([bomb]), lambda: loads_plain(bomb)):\n"
        "    try:\n"
        "        check()\n"
        "    except SerializationError as exc:\n"
        "        assert 'memo' in str(exc), exc\n"
        "    else:\n"
        "        raise SystemExit('the bomb was loaded')\n"
        "print('refused')\n"
    )

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (GiB, GiB))

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO),
                                             "MALLOC_ARENA_MAX": "1"},
                         preexec_fn=limit, timeout=120)
    assert out.stdout.strip() == "refused", out.stderr[-3000:]


@pytest.mark.parametrize("says", [b"", b"\x00", _frame(b"")],
                         ids=["silent", "one-byte", "empty-frame"])
def test_idle_socket_gets_the_handshake_timeout_without_authkey(says: bytes) -> None:
    """A socket that never says a word (or a byte, or an empty frame) held a thread and a
    descriptor forever on a server without authkey; now a peer has --handshake-timeout
    seconds to finish its first request, as it has to authenticate with an authkey."""
    with running_server(workers=1, handshake_timeout=1.0) as srv, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(says)
        assert closed_by_peer(s, 20)
        with rpycsvc.connect(srv.address, output="discard") as c:
            assert c.compute(abs, -3) == 3


def test_inbound_budget_holds_back_large_messages_only() -> None:
    """When the inbound budget is spent, an authenticated peer's large message is not read
    (backpressure) until room frees up; small messages (a stranger's first request, a
    client's hello and calls) are still served (see test_hardening_stall.py)."""
    with running_server(workers=1, max_message_size=8 * MiB, inbound_budget=8 * MiB) as srv:
        hog = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            client_handshake(hog, address=srv.address, authkey=None, timeout=10)
            hog.sendall(_header(8 * MiB - 1) + bytes(7 * MiB + 512 * 1024))  # and no more
            with _dial(srv.port) as s:  # a plain peer's small request is served
                s.sendall(_frame(_ping_request()))
                s.settimeout(30)
                assert s.recv(1)
            box: dict[str, object] = {}
            small: dict[str, object] = {}

            def late_client() -> None:
                try:
                    with rpycsvc.connect(srv.address, output="discard") as c:
                        small["result"] = c.compute(abs, -9)
                        box["result"] = c.compute(len, bytes(2 * MiB))
                except BaseException as exc:
                    box["result"] = exc

            waiter = threading.Thread(target=late_client, daemon=True)
            waiter.start()
            deadline = time.monotonic() + 60
            while "result" not in small and time.monotonic() < deadline:
                time.sleep(0.05)
            assert small.get("result") == 9, (small, box)
            waiter.join(1.0)
            assert "result" not in box, f"read past the budget: {box}"
        finally:
            hog.close()  # its bytes are given back: the client goes on
        waiter.join(30)
        assert box.get("result") == 2 * MiB, box


def test_inbound_budget_readers_waiting_for_each_other_go_on() -> None:
    """Two messages each hold half the budget and each need more: neither could finish if
    both waited for room. The one that started first goes on; when it is done, the other."""
    from rpycsvc.protocol.budget import InboundBudget, Reservation

    budget = InboundBudget(4)
    first, second = budget.start(), budget.start()
    for res in (first, second, first, second):  # the budget is spent, both are mid-message
        assert budget.take(res, 1, wait=True)
    assert not budget.take(budget.start(), 1, wait=False)  # a stranger is refused
    order: list[str] = []

    def finish(name: str, res: Reservation) -> None:
        assert budget.take(res, 1, wait=True)
        order.append(name)
        budget.finish(res)

    threads = [threading.Thread(target=finish, args=("second", second), daemon=True),
               threading.Thread(target=finish, args=("first", first), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert order == ["first", "second"]
    assert budget.used == 0


# -- item 10: oversize results and arguments --------------------------------------------------


def _blob(n: int) -> bytes:
    return b"r" * n


def _counted_blob(path: str, n: int) -> bytes:
    with open(path, "a") as f:
        f.write("ran\n")
    return b"r" * n


LIMIT = 4 * MiB


@pytest.fixture(scope="module")
def small_limit() -> Iterator[rpycsvc.Server]:
    """One worker, 4 MiB message limit."""
    with running_server(workers=1, max_message_size=LIMIT) as srv:
        yield srv


def _names_the_limit(exc: BaseException) -> None:
    text = str(exc)
    assert "4 MiB" in text and "--max-message-size" in text, text
    assert "RPYCSVC_MAX_MESSAGE_SIZE" in text, text


def test_oversize_result_fails_alone(small_limit: rpycsvc.Server) -> None:
    with rpycsvc.connect(small_limit.address, output="discard") as c:
        others = [c.submit(abs, -i) for i in range(5)]
        big = c.submit(_blob, LIMIT + MiB)
        with pytest.raises(rpycsvc.MessageTooLargeError) as err:
            big.result(timeout=60)
        _names_the_limit(err.value)
        assert "result" in str(err.value)
        assert isinstance(err.value, rpycsvc.TaskError)
        assert [f.result(timeout=60) for f in others] == [0, 1, 2, 3, 4]
        assert not c.closed  # the connection stayed up
        assert c.compute(_blob, MiB) == _blob(MiB)


def test_oversize_arguments_fail_alone_before_sending(small_limit: rpycsvc.Server) -> None:
    with rpycsvc.connect(small_limit.address, output="discard") as c:
        with pytest.raises(rpycsvc.MessageTooLargeError) as err:
            c.compute(len, _blob(LIMIT + MiB))
        _names_the_limit(err.value)
        assert "arguments" in str(err.value)
        assert c.compute(len, _blob(MiB)) == MiB
        assert not c.closed


def test_cluster_runs_an_oversize_task_once(tmp_path: Path) -> None:
    """In a Cluster the oversize task ran 4 times and dropped 4 connections; now it runs once,
    fails with MessageTooLargeError, and unrelated tasks all succeed."""
    marks = tmp_path / "runs.txt"
    with running_server(workers=1, max_message_size=LIMIT) as a, \
            running_server(workers=1, max_message_size=LIMIT) as b, \
            rpycsvc.Cluster([a.address, b.address], output="discard", retries=3) as cluster:
        others = [cluster.submit(abs, -i) for i in range(8)]
        big = cluster.submit(_counted_blob, str(marks), LIMIT + MiB)
        more = [cluster.submit(abs, -i) for i in range(8, 16)]
        with pytest.raises(rpycsvc.MessageTooLargeError) as err:
            big.result(timeout=60)
        _names_the_limit(err.value)
        assert [f.result(timeout=60) for f in others + more] == list(range(16))
        assert marks.read_text().count("ran") == 1
        assert list(cluster.map(abs, [-1, -2, -3])) == [1, 2, 3]


# -- item 11: out of file descriptors ----------------------------------------------------------


def test_accept_survives_running_out_of_descriptors(tmp_path: Path) -> None:
    """After EMFILE the accept loop used to end silently and the server refused everyone for
    good. Now it backs off, logs, counts, and accepts again once descriptors are free."""
    mport = free_port()
    with LimitedServer("--workers", "1", "--handshake-timeout", "60",
                       "--metrics-port", str(mport), logfile=tmp_path / "server.log",
                       nofile=64) as srv:
        held: list[socket.socket] = []
        try:
            for _ in range(90):  # more than the server has descriptors for
                s = _dial(srv.port)
                s.sendall(b"\x00")  # one byte of a frame header: not silent, never finished
                held.append(s)
            srv.wait_log("accepting a connection failed")
        finally:
            _close_all(held)
        with rpycsvc.connect(srv.address, output="discard", timeout=30) as c:
            assert c.compute(abs, -11) == 11
        assert srv.alive()
        assert metric(mport, "rpycsvc_accept_errors_total") >= 1


# -- item 12: pending-handshake slots ----------------------------------------------------------


@pytest.mark.parametrize("says", [b"", b"RPYC"], ids=["silent", "stalled-mid-hello"])
def test_idle_handshakes_do_not_lock_out_a_client_with_the_key(says: bytes) -> None:
    """64 silent sockets held every handshake slot for --handshake-timeout and the client
    with the right key was refused. Now a newcomer displaces the oldest silent one (or,
    when every one has said something and stalled, the oldest of the busiest host)."""
    silent = 80
    with running_server(workers=1, authkey=KEY, handshake_timeout=60.0) as srv:
        idle: list[socket.socket] = []
        try:
            for _ in range(silent):
                idle.append(_dial(srv.port))
                if says:
                    idle[-1].sendall(says)
            # the server makes room for each one past 64 (old: refuses it): wait for that
            deadline = time.monotonic() + 60
            closed: set[int] = set()
            while len(closed) < silent - 64 and time.monotonic() < deadline:
                for i, s in enumerate(idle):
                    if i not in closed and closed_by_peer(s, 0.01):
                        closed.add(i)
            assert len(closed) >= silent - 64
            # well before the silent ones' 60 s are up, the right key gets in and computes
            with rpycsvc.connect(srv.address, authkey=KEY, output="discard", timeout=20) as c:
                assert c.compute(abs, -12) == 12
            with pytest.raises(rpycsvc.AuthenticationError):  # and the wrong key does not
                rpycsvc.connect(srv.address, authkey="not the right key at all", timeout=20)
        finally:
            _close_all(idle)
