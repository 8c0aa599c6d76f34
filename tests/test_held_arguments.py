"""A client sending large tasks faster than the workers run them holds them on its own
side: the server keeps at most ``max_held`` bytes of one connection's unfinished tasks'
arguments (beyond its first such task), so its memory stays bounded (review finding: 20
queued 50 MiB arguments took a server from 26 to 1,026 MiB)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import rpycsvc
from rpycsvc.protocol.sending import send_task
from rpycsvc.protocol.serialization import dumps
from tests.support.rendezvous import Gate, pass_gate
from tests.support.servers import ServerProcess

MiB = 1 << 20
WAIT = 120.0


def gate_then_len(port: int, data: bytes) -> int:
    pass_gate(port, "first")
    return len(data)


@pytest.mark.timeout(300)
def test_queued_arguments_wait_on_the_client_not_in_the_server(
        server_process: type[ServerProcess]) -> None:
    srv = server_process("--workers", "1")
    with rpycsvc.connect(srv.address, output="discard") as c:
        limit = c.server_info["max_held"]
        before = c.stats()["rss_bytes"]
        with Gate() as gate:
            first = c.submit(gate_then_len, gate.port, bytes(8 * MiB))
            _, conn = gate.arrival()  # the only worker is busy until we release it
            futures: list[Any] = []
            done = threading.Event()

            def submit_all() -> None:
                for i in range(12):  # 600 MiB in all: more than the server keeps
                    futures.append(c.submit(len, bytes([i]) * (50 * MiB)))
                done.set()

            t = threading.Thread(target=submit_all, daemon=True)
            t.start()
            # the submits stop once the server holds max_held: they wait, the server doesn't grow
            assert not done.wait(3.0), "all 600 MiB were taken while no task could run"
            held = c.stats()["rss_bytes"] - before
            assert held < limit + 120 * MiB, (held, limit)
            gate.release(conn)
            assert first.result(timeout=WAIT) == 8 * MiB
            assert done.wait(WAIT)
            assert [f.result(timeout=WAIT) for f in futures] == [50 * MiB] * 12


@pytest.mark.timeout(300)
def test_a_client_that_does_not_wait_gets_its_excess_tasks_refused(
        server_process: type[ServerProcess]) -> None:
    srv = server_process("--workers", "1")
    with rpycsvc.connect(srv.address, output="discard") as c:
        limit = c.server_info["max_held"]
        replies: dict[int, Any] = {}
        got = threading.Event()
        with Gate() as gate:
            first = c.submit(gate_then_len, gate.port, b"x")
            _, conn = gate.arrival()
            n = limit // (64 * MiB) + 2  # past the limit, sent raw: no waiting on our side
            for key in range(10_000, 10_000 + n):
                def done(status: str, reply: Any, key: int = key) -> None:
                    replies[key] = reply
                    if len(replies) == n:
                        got.set()
                c._pending[key] = (done, ("discard", None))  # (to see the raw replies)
                send_task(c.conn, ("run", key, "path", "builtins:len", ()),
                          dumps(((bytes(64 * MiB),), {})))
            gate.release(conn)
            assert first.result(timeout=WAIT) == 1
            assert got.wait(WAIT), replies
            refused = [r for r in replies.values() if r[0] == "error"]
            assert refused and all(r[1] == "MessageTooLargeError" and "per connection" in r[2]
                                   for r in refused), replies
            assert c.compute(abs, -2) == 2 and not c.closed
