"""Plain, unmodified RPyC clients: classic access exactly as RPyC's tutorial shows it, and
compute endpoints by import path or name, with arguments fetched by value.

The server runs as a subprocess here, so "runs on the server" and "prints on the client"
mean different processes.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import rpyc
from rpyc.core.netref import BaseNetref

import rpycsvc
from tests.support.rendezvous import Barrier
from tests.support.servers import ServerProcess

WAIT = 30.0


@pytest.fixture(scope="module")
def server_proc() -> Iterator[ServerProcess]:
    proc = ServerProcess("--workers", "2", "--endpoints", "tests.support.sample_endpoints")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def conn(server_proc: ServerProcess) -> Iterator[Any]:
    """``rpyc.classic.connect`` to the rpycsvc server: a plain RPyC client."""
    c = rpyc.classic.connect("127.0.0.1", server_proc.port)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def svc_client(server_proc: ServerProcess) -> Iterator[rpycsvc.Client]:
    c = rpycsvc.connect(server_proc.address, output="capture")
    try:
        yield c
    finally:
        c.close()


def remote_pid() -> int:
    import os

    return os.getpid()


# -- classic access, both clients --------------------------------------------------------------

@pytest.fixture(params=["rpyc.classic", "rpycsvc"])
def classic(request: pytest.FixtureRequest, server_proc: ServerProcess) -> Iterator[Any]:
    """The same classic API from a plain RPyC client and from an rpycsvc client."""
    if request.param == "rpyc.classic":
        c: Any = rpyc.classic.connect("127.0.0.1", server_proc.port)
    else:
        c = rpycsvc.connect(server_proc.address, output="capture")
    try:
        yield c
    finally:
        c.close()


def test_execute_and_eval(classic: Any) -> None:
    classic.execute("x = 2")
    assert classic.eval("x * 3") == 6


def test_modules_run_on_the_server(classic: Any, server_proc: ServerProcess) -> None:
    assert classic.modules.os.getpid() == server_proc.pid
    assert server_proc.pid != os.getpid()
    assert classic.modules.sys.executable == sys.executable


def test_remote_print_on_client_stdout(classic: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """``c.modules.sys.stdout = sys.stdout`` then ``c.execute("print('hi')")``."""
    remote_sys = classic.modules.sys
    remote_sys.stdout = sys.stdout
    try:
        classic.execute("print('hi')")
    finally:
        remote_sys.stdout = remote_sys.__stdout__
    assert capsys.readouterr().out == "hi\n"


def test_remote_print_into_a_stringio(classic: Any) -> None:
    buf = io.StringIO()
    remote_sys = classic.modules.sys
    remote_sys.stdout = buf
    try:
        classic.execute("import os\nprint('from', os.getpid())")
    finally:
        remote_sys.stdout = remote_sys.__stdout__
    assert buf.getvalue() == f"from {classic.modules.os.getpid()}\n"


def test_teleport_function(classic: Any, server_proc: ServerProcess) -> None:
    conn = classic.conn if isinstance(classic, rpycsvc.Client) else classic
    fn = rpyc.classic.teleport_function(conn, remote_pid)
    assert fn() == server_proc.pid


def test_interact_is_available() -> None:
    assert callable(rpyc.classic.interact)


# -- compute from a plain RPyC client ----------------------------------------------------------

def test_compute_import_path(conn: Any) -> None:
    assert conn.root.compute("math:factorial", 5) == 120
    assert conn.root.compute("tests.support.sample_endpoints:not_an_endpoint") == "by path"


def test_compute_endpoint_by_name(conn: Any) -> None:
    assert conn.root.compute("add", 2, 3) == 5
    assert conn.root.compute("add", "a", b="b") == "ab"
    assert set(conn.root.endpoints()) >= {"add", "describe", "meet", "worker_pid"}


def test_compute_runs_in_a_worker(conn: Any, server_proc: ServerProcess) -> None:
    pid = conn.root.compute("worker_pid")
    assert pid != server_proc.pid
    assert pid in rpyc.classic.obtain(conn.root.stats())["worker_pids"]


def test_plain_client_arguments_arrive_by_value(conn: Any) -> None:
    assert conn.root.compute("describe", [1, 2, 3]) == ("list",)
    assert conn.root.compute("describe", {"a": [1]}, {1, 2}, (1, 2), bytearray(b"x"),
                             k=[{"n": 1}]) == ("dict", "set", "tuple", "bytearray", "k=list")
    # the values themselves made it, not just the types (a list result is a netref for
    # plain RPyC: brine sends only immutable builtins by value; obtain copies it)
    assert rpyc.classic.obtain(conn.root.compute("add", [1, 2], [3])) == [1, 2, 3]


def test_plain_client_function_netref_is_refused(conn: Any) -> None:
    calls: list[int] = []

    def local_task() -> int:
        calls.append(1)  # would run here, on the client, if the server called the netref
        return 1

    with pytest.raises(TypeError) as info:
        conn.root.compute(local_task)
    message = str(info.value)
    assert "rpycsvc.connect" in message
    assert "module:function" in message
    assert calls == []
    with pytest.raises(TypeError):
        conn.root.compute(lambda: calls.append(2))
    assert calls == []


def test_plain_client_task_exception(conn: Any) -> None:
    with pytest.raises(ValueError, match="nope"):
        conn.root.compute("fail", "nope")
    assert conn.root.compute("add", 1, 1) == 2


def test_plain_client_stats(conn: Any, server_proc: ServerProcess) -> None:
    stats = rpyc.classic.obtain(conn.root.stats())
    assert type(stats) is dict
    assert stats["pid"] == server_proc.pid
    assert stats["workers"] == 2
    assert stats["rpyc_version"] == rpyc.__version__


def test_async_on_one_plain_connection_runs_tasks_at_once(conn: Any) -> None:
    compute = rpyc.async_(conn.root.compute)  # keep a reference: wrappers are cached weakly
    with Barrier(2) as barrier:
        results = [compute("meet", barrier.port) for _ in range(2)]
        for r in results:
            r.set_expiry(WAIT)
        pids = {r.value for r in results}
    assert barrier.met.is_set()
    assert len(pids) == 2


def test_plain_client_results_are_by_value_where_rpyc_allows(conn: Any) -> None:
    out = conn.root.compute("describe", 1, "s", b"b", None, 1.5)
    assert out == ("int", "str", "bytes", "NoneType", "float")
    assert not isinstance(out, BaseNetref)
