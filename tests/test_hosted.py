"""Server-hosted queues (rpycsvc.Queue, conn.root.queue) and hosted objects (--service)."""

from __future__ import annotations

import threading

import pytest
import rpyc

import rpycsvc
from tests.support.servers import running_server


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    with running_server(workers=1, services=["tests.support.shopmod:Counter"]) as srv:
        yield srv


def test_queue_is_shared_by_clients_and_carries_values(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address) as a, rpycsvc.connect(server.address) as b:
        qa, qb = rpycsvc.Queue(a, "jobs"), rpycsvc.Queue(b, "jobs")
        qa.put({"n": [1, 2, 3]})
        item = qb.get(timeout=5)
        assert item == {"n": [1, 2, 3]} and type(item["n"]) is list  # a value, not a netref
        assert qa.empty() and qb.qsize() == 0


def test_queue_survives_the_client_that_put(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address) as a:
        rpycsvc.Queue(a, "left-behind").put([4, 5])
    with rpycsvc.connect(server.address) as b:
        assert rpycsvc.Queue(b, "left-behind").get(timeout=5) == [4, 5]


def test_queue_get_times_out_and_a_waiting_get_is_woken(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address) as a, rpycsvc.connect(server.address) as b:
        q = rpycsvc.Queue(a, "empty")
        with pytest.raises(TimeoutError, match="stayed empty"):
            q.get(timeout=0.2)
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(q.get(timeout=20)))
        waiter.start()
        rpycsvc.Queue(b, "empty").put("wake up")
        waiter.join(30)
        assert got == ["wake up"]


def test_bounded_queue_put_times_out(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address) as a:
        q = rpycsvc.Queue(a, "bounded", maxsize=1)
        q.put(1)
        with pytest.raises(TimeoutError, match="stayed full"):
            q.put(2, timeout=0.2)


def test_plain_rpyc_client_uses_queues_and_hosted_objects(server: rpycsvc.Server) -> None:
    c = rpyc.classic.connect("127.0.0.1", server.port)
    try:
        q = c.root.queue("plain")
        q.put((1, "two", b"3"))
        assert q.get(5) == (1, "two", b"3")
        with pytest.raises(TypeError, match=r"rpycsvc\.Queue"):
            q.put([1, 2])  # a list would be a netref into this client
        assert c.root.hosted() == ("counter",)
        assert c.root.counter.bump() >= 1
    finally:
        c.close()


def test_hosted_object_scopes() -> None:
    for scope, expected in (("server", [1, 2]), ("connection", [1, 1])):
        with running_server(workers=1, services=["tests.support.shopmod:Counter=ctr"],
                            service_scope=scope) as srv:
            got = []
            for _ in range(2):
                with rpycsvc.connect(srv.address) as c:
                    got.append(c.root.ctr.bump())
            assert got == expected, scope


def test_bad_service_spec_is_refused() -> None:
    with pytest.raises(rpycsvc.ConfigError, match="module:Class"):
        rpycsvc.Server(rpycsvc.ServerConfig(port=0, services=["nocolon"]))
    with pytest.raises(rpycsvc.ConfigError, match="no_such_module"):
        rpycsvc.Server(rpycsvc.ServerConfig(port=0, services=["no_such_module:X"]))
