"""The server: worker pool parallelism, many tasks per connection, fairness between clients,
task failures and worker crashes, stats, and the version handshake.

Concurrency is proven structurally with the barrier/gate in tests.support.rendezvous:
tasks that must meet each other can only all succeed if they ran at the same time.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from rpyc.core.netref import BaseNetref

import rpycsvc
from rpycsvc.protocol import handshake
from tests.support.rendezvous import Barrier, Gate, meet, pass_gate
from tests.support.sample_endpoints import TwoArgError
from tests.support.servers import running_server

WAIT = 30.0


# -- the worker pool ---------------------------------------------------------------------------

def test_cpu_bound_tasks_run_in_parallel_processes(client: rpycsvc.Client,
                                                   server: rpycsvc.Server) -> None:
    workers = client.stats()["worker_pids"]
    assert len(workers) == 2
    with Barrier(2) as barrier:
        futures = [client.submit(meet, barrier.port, spin=True) for _ in range(2)]
        pids = {f.result(timeout=WAIT) for f in futures}
    assert barrier.met.is_set()
    assert len(pids) == 2, "both tasks must run at once, in two different processes"
    assert os.getpid() not in pids  # the in-process server's own pid
    assert pids <= set(workers)


def test_more_tasks_than_workers_queue_then_all_run(client: rpycsvc.Client) -> None:
    futures = [client.submit(lambda i: i * i, i) for i in range(25)]
    assert [f.result(timeout=WAIT) for f in futures] == [i * i for i in range(25)]


def test_one_client_from_several_threads(client: rpycsvc.Client) -> None:
    """One connection, called from two threads at once: both tasks run at the same time."""
    with Barrier(2) as barrier, ThreadPoolExecutor(2) as threads:
        results = list(threads.map(lambda _: client.compute(meet, barrier.port), range(2)))
    assert barrier.met.is_set()
    assert len(set(results)) == 2


def test_barrier_fails_when_tasks_cannot_run_at_once() -> None:
    """The proof device itself: with one worker, two barrier tasks can't both succeed."""
    with running_server(workers=1) as srv, rpycsvc.connect(srv.address) as c, \
            Barrier(2, timeout=3) as barrier:
        futures = [c.submit(meet, barrier.port, 3.0) for _ in range(2)]
        errors = [f.exception(timeout=WAIT) for f in futures]
    assert not barrier.met.is_set()
    assert any(isinstance(e, (TimeoutError, ConnectionError, OSError)) for e in errors)


def test_fair_share_between_clients(server: rpycsvc.Server) -> None:
    """Client A queues 20 tasks first; client B's single task is served among the first few,
    not after A's 20."""
    # The pool is the server's only scheduler: this is its round-robin order between clients.
    with rpycsvc.connect(server.address, output="discard") as a, \
            rpycsvc.connect(server.address, output="discard") as b, \
            Gate() as gate:
        fa = [a.submit(pass_gate, gate.port, f"A{i}") for i in range(20)]
        a.ping()  # requests on one connection are handled in order: all 20 are queued now
        fb = b.submit(pass_gate, gate.port, "B")
        b.ping()
        # Release one task at a time, and only while both workers' tasks are at the gate:
        # then which task a freed worker takes next is decided before the next release,
        # and the release order is the pool's dispatch order, however slow a worker is.
        order: list[str] = []
        waiting: list[tuple[str, socket.socket]] = []
        while "B" not in order:
            while len(waiting) < 2:
                waiting.append(gate.arrival())
            label, conn = waiting.pop(0)
            gate.release(conn)
            order.append(label)
        assert fb.result(timeout=WAIT) == "B"  # while most of A's tasks are still queued
        # A0 and A1 were running (in either order); then round robin: A2 for the first
        # freed worker, B for the second, not after A's other 17.
        assert sorted(order[:2]) == ["A0", "A1"] and order[2:] == ["A2", "B"], order
        for _, conn in waiting:
            gate.release(conn)
        for _ in range(21 - len(order) - len(waiting)):
            gate.release(gate.arrival()[1])
        assert sorted(f.result(timeout=WAIT) for f in fa) == sorted(f"A{i}" for i in range(20))


# -- task failures -----------------------------------------------------------------------------

class Unusual(Exception):
    pass


def raise_value_error(n: int) -> None:
    raise ValueError(f"bad value {n}")


def test_exception_keeps_type_traceback_and_address(client: rpycsvc.Client,
                                                    server: rpycsvc.Server) -> None:
    with pytest.raises(ValueError, match="bad value 7") as info:
        client.compute(raise_value_error, 7)
    exc = info.value
    assert exc.remote_traceback  # type: ignore[attr-defined]
    assert "raise_value_error" in exc.remote_traceback  # type: ignore[attr-defined]
    assert "ValueError: bad value 7" in exc.remote_traceback  # type: ignore[attr-defined]
    assert exc.address == server.address  # type: ignore[attr-defined]
    assert server.address in str(exc.__cause__)


def test_exception_defined_by_user_is_rebuilt(client: rpycsvc.Client) -> None:
    def boom() -> None:
        raise Unusual("custom")

    with pytest.raises(Unusual, match="custom"):
        client.compute(boom)
    with pytest.raises(KeyError):
        client.compute(lambda: {}["missing"])


def test_unrebuildable_exception_becomes_remote_task_error(client: rpycsvc.Client,
                                                           server: rpycsvc.Server) -> None:
    def boom() -> None:
        raise TwoArgError("disk", "full")

    with pytest.raises(rpycsvc.RemoteTaskError) as info:
        client.compute(boom)
    err = info.value
    assert err.remote_type == "tests.support.sample_endpoints.TwoArgError"
    assert "disk: full" in str(err)
    assert "TwoArgError" in err.remote_traceback
    assert err.address == server.address
    assert isinstance(err, rpycsvc.TaskError) and isinstance(err, rpycsvc.RpycsvcError)


def test_memory_error_in_task_is_an_exception(client: rpycsvc.Client) -> None:
    with pytest.raises(MemoryError):
        client.compute(lambda: bytearray(1 << 62))
    assert client.compute(lambda: 1) == 1


def test_memory_limit_gives_memory_error_and_the_worker_survives() -> None:
    """With --memory-limit a runaway allocation fails as MemoryError, in the same worker."""
    with running_server(workers=1, memory_limit=1 << 30) as srv, \
            rpycsvc.connect(srv.address) as c:
        pids = c.stats()["worker_pids"]
        with pytest.raises(MemoryError) as info:
            c.compute(lambda: bytearray(2 << 30))
        assert info.value.address == srv.address  # type: ignore[attr-defined]
        assert c.compute(lambda: len(bytearray(1 << 20))) == 1 << 20
        assert c.stats()["worker_pids"] == pids


def test_sys_exit_in_task_is_a_clear_error_not_an_exit(client: rpycsvc.Client) -> None:
    pids = client.stats()["worker_pids"]
    with pytest.raises(rpycsvc.RemoteTaskError) as info:
        client.compute(lambda: sys.exit(3))
    assert "SystemExit" in info.value.remote_type
    assert "SystemExit" in info.value.remote_traceback
    assert client.compute(lambda: "next") == "next"
    assert client.stats()["worker_pids"] == pids  # sys.exit doesn't cost a worker


@pytest.fixture
def crash_server() -> Iterator[rpycsvc.Server]:
    """A server of our own: crash tests replace its workers."""
    with running_server() as srv:
        yield srv


@pytest.mark.parametrize(
    ("how", "expect"),
    [("os._exit", "exit code 3"), ("segfault", "SIGSEGV")],
)
def test_task_killing_its_worker(crash_server: rpycsvc.Server, how: str, expect: str) -> None:
    def die() -> None:
        if how == "os._exit":
            os._exit(3)
        ctypes.string_at(0)  # reads address 0: SIGSEGV

    with rpycsvc.connect(crash_server.address) as victim, \
            rpycsvc.connect(crash_server.address) as bystander, Gate() as gate:
        before = set(victim.stats()["worker_pids"])
        # The bystander's task occupies the other worker across the crash.
        other = bystander.submit(pass_gate, gate.port, "bystander")
        _, conn = gate.arrival()
        with pytest.raises(rpycsvc.WorkerCrashedError) as info:
            victim.compute(die)
        assert expect in str(info.value)
        assert "replaced" in str(info.value)
        assert info.value.address == crash_server.address
        gate.release(conn)
        assert other.result(timeout=WAIT) == "bystander"  # other clients are unaffected
        assert bystander.compute(lambda: "ok") == "ok"
        assert victim.compute(lambda: "next") == "next"
        # Both workers are back: two tasks meet, and one of them runs in a new process.
        with Barrier(2) as barrier:
            pids = {f.result(timeout=WAIT)
                    for f in [victim.submit(meet, barrier.port) for _ in range(2)]}
        assert len(pids) == 2
        assert pids - before, "the dead worker was replaced by a new process"
        stats = victim.stats()
        assert set(stats["worker_pids"]) == pids
        assert stats["worker_restarts"] == 1
        assert stats["tasks_failed"] >= 1


# -- stats -------------------------------------------------------------------------------------

def test_stats_is_a_plain_dict(client: rpycsvc.Client, server: rpycsvc.Server) -> None:
    client.compute(lambda: None)
    stats = client.root.stats()
    assert type(stats) is dict
    assert not isinstance(stats, BaseNetref)
    assert stats == {**stats, "host": socket.gethostname(), "pid": os.getpid(),
                     "workers": 2, "address": server.address}
    import rpyc

    assert stats["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert stats["rpyc_version"] == rpyc.__version__
    assert stats["rpycsvc_version"] == rpycsvc.__version__
    assert stats["cores"] == os.cpu_count()
    for key in ("tasks_running", "tasks_queued", "tasks_done", "tasks_failed"):
        assert isinstance(stats[key], int) and stats[key] >= 0, key
    assert stats["tasks_done"] >= 1
    assert stats["uptime"] > 0
    assert len(stats["load_average"]) == 3
    assert stats["rss_bytes"] > 0
    assert stats["rss_total_bytes"] >= stats["rss_bytes"]
    assert len(stats["worker_pids"]) == 2


def test_stats_counts_running_and_queued(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address) as c, Gate() as gate:
        futures = [c.submit(pass_gate, gate.port, str(i)) for i in range(3)]
        arrived = [gate.arrival(), gate.arrival()]
        c.ping()
        stats = c.stats()
        assert stats["tasks_running"] == 2
        assert stats["tasks_queued"] == 1
        for _, conn in arrived:
            gate.release(conn)
        gate.release(gate.arrival()[1])
        assert sorted(f.result(timeout=WAIT) for f in futures) == ["0", "1", "2"]


# -- versions ----------------------------------------------------------------------------------

def _raw_hello(address: str, hello: dict[str, Any]) -> dict[str, Any]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(handshake.MAGIC)
        data = json.dumps(hello).encode()
        sock.sendall(len(data).to_bytes(4, "big") + data)
        sock.settimeout(10)
        n = int.from_bytes(handshake._recv_exact(sock, 4), "big")
        reply: dict[str, Any] = json.loads(handshake._recv_exact(sock, n))
        # ...and then the server hangs up: no RPyC traffic follows a refused hello.
        assert sock.recv(1) == b""
    return reply


@pytest.mark.parametrize(
    "theirs",
    [{"rpycsvc": "0.0.1"}, {"rpyc": "5.3.1"}],
    ids=["other-rpycsvc", "other-rpyc"],
)
def test_server_names_both_versions_on_mismatch(server: rpycsvc.Server,
                                                theirs: dict[str, str]) -> None:
    mine = handshake.versions()
    hello = {**mine, **theirs, "auth": False}
    reply = _raw_hello(server.address, hello)
    assert reply["ok"] is False
    assert reply["error"] == "version mismatch"
    assert reply["rpycsvc"] == rpycsvc.__version__
    message = reply["message"]
    for version in {hello["rpycsvc"], hello["rpyc"], mine["rpycsvc"], mine["rpyc"]}:
        assert version in message
    assert "rpycsvc" in message and "rpyc" in message


def _fake_server(reply: dict[str, Any]) -> tuple[socket.socket, threading.Thread]:
    """A one-connection server on 127.0.0.1 that answers any hello with ``reply``."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)

    def answer() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(WAIT)
            assert handshake._recv_exact(conn, len(handshake.MAGIC)) == handshake.MAGIC
            handshake._recv_json(conn)
            handshake._send_json(conn, reply)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("ok", [True, False], ids=["server-accepts", "server-refuses"])
def test_client_handshake_detects_other_versions(ok: bool) -> None:
    theirs = {"rpycsvc": "9.9.9", "rpyc": "5.3.1", "python": "3.8.0", "ok": ok}
    if not ok:
        theirs["error"] = "version mismatch"
    listener, thread = _fake_server(theirs)
    try:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
                pytest.raises(rpycsvc.VersionMismatchError) as info:
            handshake.client_handshake(sock, address=f"127.0.0.1:{port}", authkey=None,
                                       timeout=10)
        thread.join(WAIT)
    finally:
        listener.close()
    message = str(info.value)
    mine = handshake.versions()
    for version in ("9.9.9", "5.3.1", mine["rpycsvc"], mine["rpyc"]):
        assert version in message
    assert info.value.address == f"127.0.0.1:{port}"
    assert isinstance(info.value, rpycsvc.ConnectError)


def test_connect_to_other_version_raises_version_mismatch() -> None:
    """Through rpycsvc.connect, the same fake server gives VersionMismatchError."""
    listener, thread = _fake_server({"rpycsvc": "9.9.9", "rpyc": "6.0.2", "ok": True})
    try:
        port = listener.getsockname()[1]
        with pytest.raises(rpycsvc.VersionMismatchError, match=r"9\.9\.9"):
            rpycsvc.connect("127.0.0.1", port, timeout=10)
        thread.join(WAIT)
    finally:
        listener.close()
