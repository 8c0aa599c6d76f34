"""The one task path, as ``stats()`` and users see it.

Every task of an rpycsvc client travels as task messages inside its one connection, on
every transport — plain TCP, TLS, and the stdio pipes of a deployed (SSH) server — and the
server relays it to its pool. ``stats()`` says how many tasks came which way:
``tasks_by_path`` (``"task"``: rpycsvc clients' tasks; ``"rpyc"``: ``conn.root.compute``
calls of plain RPyC clients) and ``tasks_by_transport`` (``"tcp"``, ``"tls"``, ``"ssh"``:
the transport of the task messages). Counters are compared before and after, so a shared
server's other traffic can't disturb them.

Also here: a gigabyte each way over TCP, TLS and SSH (``slow``: it needs several GiB of free
memory), and malformed tasks that the server refuses alone. Functions of this module travel
by value (a deployed server can't import it).
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

import pytest
import rpyc

import rpycsvc
from rpycsvc.protocol.handshake import client_ssl_context
from rpycsvc.protocol.serialization import dumps
from tests.support.byvalue import (
    available_memory,
    tasks_by_value,  # noqa: F401 (an autouse fixture)
)
from tests.support.certs import Certs
from tests.support.servers import ServerProcess, running_server
from tests.support.sshd import SshServer

WAIT = 60.0
MiB = 1 << 20
GiB = 1 << 30
PATTERN = bytes(range(256))
TRANSPORTS = ("tcp", "tls", "ssh")




def counts(c: rpycsvc.Client) -> tuple[dict[str, int], dict[str, int]]:
    """``(tasks_by_path, tasks_by_transport)`` from the server's stats()."""
    stats = c.stats()
    return dict(stats["tasks_by_path"]), dict(stats["tasks_by_transport"])


def grew(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """How much each counter grew (every key, zeros included)."""
    assert set(after) == set(before), (before, after)
    return {k: after[k] - before[k] for k in before}


def with_pid(fn: Any, *args: Any) -> tuple[Any, int]:
    return fn(*args), os.getpid()


def run_three_tasks(c: rpycsvc.Client) -> None:
    """compute(), submit() and a thread-mode task, each run by a worker (not the server)."""
    server_pid = c.stats()["pid"]
    value, pid = c.compute(with_pid, abs, -1)
    assert value == 1 and pid != server_pid
    value, pid = c.submit(with_pid, abs, -2).result(timeout=WAIT)
    assert value == 2 and pid != server_pid
    value, pid = c.options(mode="thread").compute(with_pid, abs, -3)
    assert value == 3 and pid != server_pid


def assert_counted(c: rpycsvc.Client, transport: str) -> None:
    """Three tasks of ``c`` count three on the task path and on ``transport``, and
    nothing anywhere else."""
    path0, by0 = counts(c)
    run_three_tasks(c)
    path1, by1 = counts(c)
    assert grew(path0, path1) == {"task": 3, "rpyc": 0}
    assert grew(by0, by1) == {t: 3 if t == transport else 0 for t in TRANSPORTS}


# -- tasks_by_path, tasks_by_transport -----------------------------------------------------------

def test_stats_have_the_path_and_transport_counters() -> None:
    with running_server(workers=1) as srv, \
            rpycsvc.connect(srv.address, output="discard") as c:
        path, by = counts(c)
        assert path == {"task": 0, "rpyc": 0}
        assert by == dict.fromkeys(TRANSPORTS, 0)


def test_tasks_over_plain_tcp_are_counted_as_task_and_tcp(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address, output="discard") as c:
        assert_counted(c, "tcp")


def test_tasks_with_an_authkey_are_counted_as_task_and_tcp() -> None:
    with running_server(workers=1, authkey="one path key") as srv, \
            rpycsvc.connect(srv.address, authkey="one path key", output="discard") as c:
        assert_counted(c, "tcp")


def test_tasks_over_tls_are_counted_as_task_and_tls(certs: Certs) -> None:
    with running_server(workers=1, ssl_keyfile=str(certs.server_key),
                        ssl_certfile=str(certs.server_cert)) as srv, \
            rpycsvc.connect(srv.address, ssl=client_ssl_context(ca=str(certs.ca)),
                            output="discard") as c:
        assert_counted(c, "tls")


@pytest.mark.ssh
@pytest.mark.timeout(300)
def test_tasks_on_a_deployed_host_are_counted_as_task_and_ssh(sshd: SshServer) -> None:
    cluster = rpycsvc.deploy([sshd.alias], ssh_options=["-F", str(sshd.config_path)],
                             timeout=30, output="discard")
    try:
        assert_counted(cluster[0], "ssh")
        # a Cluster's own submit takes the same path
        path0, by0 = counts(cluster[0])
        assert cluster.submit(abs, -4).result(timeout=WAIT) == 4
        assert list(cluster.map(abs, [-5, -6])) == [5, 6]
        path1, by1 = counts(cluster[0])
        assert grew(path0, path1)["task"] >= 3 and grew(path0, path1)["rpyc"] == 0
        assert grew(by0, by1)["ssh"] == grew(path0, path1)["task"]
        assert grew(by0, by1)["tcp"] == grew(by0, by1)["tls"] == 0
    finally:
        cluster.close()


def test_plain_rpyc_compute_is_counted_as_rpyc(server: rpycsvc.Server) -> None:
    """``conn.root.compute`` of a plain RPyC client counts on the "rpyc" path; it sends no
    task messages, so no transport counts it."""
    host, port = server.address.rsplit(":", 1)
    with rpycsvc.connect(server.address, output="discard") as c:
        path0, by0 = counts(c)
        conn = rpyc.connect(host, int(port))
        try:
            assert conn.root.compute("builtins:abs", -7) == 7
            assert conn.root.compute("builtins:len", b"x" * 1000) == 1000
        finally:
            conn.close()
        path1, by1 = counts(c)
    assert grew(path0, path1) == {"task": 0, "rpyc": 2}
    assert grew(by0, by1) == dict.fromkeys(TRANSPORTS, 0)


# -- malformed tasks are refused alone -----------------------------------------------------------

def test_malformed_tasks_are_refused_alone() -> None:
    """Tasks the client library would never send (a bad timeout, an unknown kind), sent
    with the low-level ``start_task``: each is refused with an error naming the problem,
    no worker is lost, nothing is left booked, and the connection goes on."""
    with running_server(workers=1, classic=False,
                        endpoints=["tests.support.sample_endpoints"]) as srv, \
            rpycsvc.connect(srv.address, output="discard") as c:
        assert c.compute("add", 1, 2) == 3
        before = c.stats()
        frames = dumps(((1, 2), {}), "arguments")
        bad: list[tuple[str, str, dict[str, Any], str]] = [
            ("endpoint", "add", {"timeout": "1"}, "timeout"),
            ("endpoint", "add", {"timeout": float("nan")}, "timeout"),
            ("nonsense", "add", {}, "nonsense")]
        for kind, spec, opts, says in bad:
            reply: concurrent.futures.Future[tuple[str, Any]] = concurrent.futures.Future()

            def done(status: str, value: Any, r: Any = reply) -> None:
                r.set_result((status, value))

            c.start_task(kind, spec, opts, tuple(frames), done)
            status, value = reply.result(timeout=WAIT)
            assert status == "reply" and value[0] == "error", (status, value)
            assert says in str(value[2]), value
            assert c.compute("add", 2, 3) == 5
        after = c.stats()
        assert (after["worker_restarts"], after["tasks_running"], after["tasks_queued"]) == (
            before["worker_restarts"], 0, 0)
        assert after["worker_pids"] == before["worker_pids"]
        assert c.lost is None and not c.closed


# -- a gigabyte each way -------------------------------------------------------------------------


def length_and_ends(data: bytes) -> tuple[int, bool]:
    """The argument's length, and whether both its ends hold the pattern."""
    return len(data), data[:256] == data[-256:] == PATTERN


def patterned(n: int) -> bytes:
    return PATTERN * (n // len(PATTERN))


@pytest.mark.slow
@pytest.mark.skipif(available_memory() < 8 * GiB,
                    reason="needs ~8 GiB of available memory (MemAvailable)")
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_1_gib_argument_and_1_gib_result(certs: Certs, transport: str) -> None:
    """A 1 GiB argument (the task returns its length) and a 1 GiB result, under the
    default message limit, over plain TCP and TLS; the connection stays and the tasks
    count once each on the task path."""
    tls = transport == "tls"
    keys = (["--ssl-keyfile", str(certs.server_key), "--ssl-certfile", str(certs.server_cert)]
            if tls else [])
    # The server runs in a process of its own, as it does for users: in this one it would
    # share the client's GIL, and the client's copies of a gigabyte (under CI's load, seconds
    # each) would stall its heartbeat too, which the client's liveness check reads as a
    # frozen server (seen in CI: "sent nothing for 11.8 s").
    with ServerProcess("--workers", "1", *keys) as srv, \
            rpycsvc.connect(srv.address, output="discard",
                            ssl=client_ssl_context(ca=str(certs.ca)) if tls else None) as c:
        path0, by0 = counts(c)
        data = patterned(GiB)
        assert c.submit(length_and_ends, data).result(timeout=1200) == (GiB, True)
        del data
        back = c.submit(patterned, GiB).result(timeout=1200)
        assert type(back) is bytes and len(back) == GiB
        assert back[:256] == back[-256:] == PATTERN and back[GiB // 2:GiB // 2 + 4] == b"\0\1\2\3"
        del back
        assert c.compute(abs, -1) == 1 and not c.closed and c.lost is None
        path1, by1 = counts(c)
        assert grew(path0, path1) == {"task": 3, "rpyc": 0}
        assert grew(by0, by1)[transport] == 3


@pytest.mark.slow
@pytest.mark.ssh
@pytest.mark.skipif(available_memory() < 8 * GiB,
                    reason="needs ~8 GiB of available memory (MemAvailable)")
@pytest.mark.timeout(1800)
def test_1_gib_argument_and_1_gib_result_on_a_deployed_host(sshd: SshServer) -> None:
    """The same gigabyte each way to a server deployed over SSH with default settings: the
    task messages travel through the ssh session's pipes, the connection stays, and the
    tasks count once each on the task path and the ssh transport."""
    cluster = rpycsvc.deploy([sshd.alias], ssh_options=["-F", str(sshd.config_path)],
                             timeout=30, output="discard")
    try:
        c = cluster[0]
        path0, by0 = counts(c)
        data = patterned(GiB)
        assert c.submit(length_and_ends, data).result(timeout=1200) == (GiB, True)
        del data
        back = c.submit(patterned, GiB).result(timeout=1200)
        assert type(back) is bytes and len(back) == GiB
        assert back[:256] == back[-256:] == PATTERN and back[GiB // 2:GiB // 2 + 4] == b"\0\1\2\3"
        del back
        assert c.compute(abs, -1) == 1 and not c.closed and c.lost is None
        assert cluster.submit(abs, -2).result(timeout=WAIT) == 2
        path1, by1 = counts(c)
        assert grew(path0, path1) == {"task": 4, "rpyc": 0}
        assert grew(by0, by1) == {t: 4 if t == "ssh" else 0 for t in TRANSPORTS}
    finally:
        cluster.close()
