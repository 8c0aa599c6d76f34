"""Named endpoints: ``@rpycsvc.endpoint``, loading modules of them, import paths, and calling
them by name from rpycsvc and plain RPyC clients, in classic and service-only servers."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import rpyc

import rpycsvc
from rpycsvc.server.endpoints import load_endpoints, resolve_path
from tests.support import sample_endpoints
from tests.support.servers import running_server

SAMPLE = "tests.support.sample_endpoints"


# -- marking and loading (no server) -----------------------------------------------------------

def test_sample_module_endpoints() -> None:
    table = load_endpoints([SAMPLE])
    assert set(table) == {"add", "describe", "worker_pid", "meet", "fail"}
    assert table["add"] is sample_endpoints.add
    assert table["worker_pid"] is sample_endpoints._pid  # registered under its given name
    assert "not_an_endpoint" not in table


def test_endpoint_decorator_forms() -> None:
    @rpycsvc.endpoint
    def plain() -> int:
        return 1

    @rpycsvc.endpoint(name="renamed")
    def original() -> int:
        return 2

    assert plain() == 1 and original() == 2  # unchanged functions
    assert plain.__rpycsvc_endpoint__ == "plain"  # type: ignore[attr-defined]
    assert original.__rpycsvc_endpoint__ == "renamed"  # type: ignore[attr-defined]
    with pytest.raises(rpycsvc.ConfigError, match="needs a function"):
        rpycsvc.endpoint(42)  # type: ignore[call-overload]


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path for throwaway endpoint modules."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _module(where: Path, name: str, body: str) -> str:
    (where / f"{name}.py").write_text(textwrap.dedent(body))
    return name


def test_module_that_fails_to_import(modules: Path) -> None:
    name = _module(modules, "ep_broken", "raise RuntimeError('half written')\n")
    with pytest.raises(rpycsvc.ConfigError) as info:
        load_endpoints([name])
    assert "ep_broken" in str(info.value) and "half written" in str(info.value)
    with pytest.raises(rpycsvc.ConfigError, match="can't import module 'ep_missing_xyz'"):
        load_endpoints(["ep_missing_xyz"])


def test_module_without_endpoints(modules: Path) -> None:
    name = _module(modules, "ep_none", "def f():\n    return 1\n")
    with pytest.raises(rpycsvc.ConfigError, match=r"'ep_none' has no function marked"):
        load_endpoints([name])


def test_two_endpoints_with_one_name(modules: Path) -> None:
    one = _module(modules, "ep_one", """
        import rpycsvc

        @rpycsvc.endpoint(name="same")
        def a():
            return "a"
    """)
    two = _module(modules, "ep_two", """
        import rpycsvc

        @rpycsvc.endpoint(name="same")
        def b():
            return "b"
    """)
    with pytest.raises(rpycsvc.ConfigError, match="two endpoints are named 'same'"):
        load_endpoints([one, two])


def test_resolve_import_paths() -> None:
    import math
    import os.path

    assert resolve_path("math:factorial") is math.factorial
    assert resolve_path("os.path:join") is os.path.join
    assert resolve_path(f"{SAMPLE}:Point.norm2") is sample_endpoints.Point.norm2


@pytest.mark.parametrize(
    ("path", "expect"),
    [
        ("no_colon", "neither a registered endpoint nor an import path"),
        ("math:", "neither a registered endpoint nor an import path"),
        (":f", "neither a registered endpoint nor an import path"),
        ("no_such_mod_xyz:f", "can't import module 'no_such_mod_xyz'"),
        ("math:nothing", "has no 'nothing'"),
        ("math:pi", "names float object, not a function"),
    ],
)
def test_bad_import_paths(path: str, expect: str) -> None:
    with pytest.raises(rpycsvc.ConfigError, match=expect):
        resolve_path(path)


# -- on a server ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server() -> Iterator[rpycsvc.Server]:
    with running_server(endpoints=[SAMPLE], workers=1) as srv:
        yield srv


def test_server_lists_its_endpoints(client: rpycsvc.Client) -> None:
    names = {"add", "describe", "worker_pid", "meet", "fail"}
    assert set(client.server_info["endpoints"]) == names
    assert set(client.root.endpoints()) == names


def test_call_by_name_from_both_clients(client: rpycsvc.Client, server: rpycsvc.Server) -> None:
    assert client.compute("add", 20, 22) == 42
    assert client.submit("describe", [1], k={2}).result(timeout=30) == ("list", "k=set")
    host, port = server.address.rsplit(":", 1)
    plain = rpyc.classic.connect(host, int(port))
    try:
        assert plain.root.compute("add", 20, 22) == 42
        assert plain.root.compute("describe", [1], k={2}) == ("list", "k=set")
    finally:
        plain.close()


def test_endpoint_exception_from_both_clients(client: rpycsvc.Client,
                                              server: rpycsvc.Server) -> None:
    with pytest.raises(ValueError, match="broken on purpose") as info:
        client.compute("fail", "broken on purpose")
    assert "sample_endpoints.py" in info.value.remote_traceback  # type: ignore[attr-defined]
    host, port = server.address.rsplit(":", 1)
    plain = rpyc.classic.connect(host, int(port))
    try:
        with pytest.raises(ValueError, match="broken on purpose"):
            plain.root.compute("fail", "broken on purpose")
    finally:
        plain.close()


def test_unknown_name_from_a_plain_client(server: rpycsvc.Server) -> None:
    host, port = server.address.rsplit(":", 1)
    plain = rpyc.classic.connect(host, int(port))
    try:
        with pytest.raises(ValueError, match="neither a registered endpoint"):
            plain.root.compute("nope")
    finally:
        plain.close()


def test_server_refuses_to_start_with_a_bad_endpoints_module() -> None:
    with pytest.raises(rpycsvc.ConfigError, match="no_such_module_xyz"), \
            running_server(endpoints=["no_such_module_xyz"], workers=1):
        pass


# -- service-only mode -----------------------------------------------------------------------------

def test_service_only_runs_endpoints_by_name(service_only: rpycsvc.Server) -> None:
    with rpycsvc.connect(service_only.address) as c:
        assert c.compute("add", 1, 2) == 3
        assert c.compute("describe", [1], {"a": 1}) == ("list", "dict")


def test_service_only_maps_an_endpoint_over_a_range(service_only: rpycsvc.Server) -> None:
    """A map's range input travels as plain data to a service-only server (the chunk format
    sends a range as slices of it, but a range is a global there)."""
    import asyncio

    expected = [("int",)] * 5
    with rpycsvc.Cluster([service_only.address], output="discard") as cluster:
        assert list(cluster.map("describe", range(5), timeout=60)) == expected
        assert list(cluster.map("describe", [0, 1, 2, 3, 4], timeout=60)) == expected

    async def amain() -> list[object]:
        async with rpycsvc.AsyncCluster([service_only.address], output="discard") as ac:
            return [x async for x in ac.map("describe", range(5))]

    assert asyncio.run(amain()) == expected


@pytest.mark.parametrize("task", [lambda: 1, "os:system", "math:factorial"],
                         ids=["function", "dangerous-path", "harmless-path"])
def test_service_only_refuses_code_and_import_paths(service_only: rpycsvc.Server,
                                                    task: object) -> None:
    """No code from clients, and no import paths either: "os:system" would be code."""
    with rpycsvc.connect(service_only.address) as c:
        with pytest.raises(rpycsvc.RemoteTaskError) as info:
            c.compute(task, "true")
        assert info.value.remote_type == "PermissionError"
        assert "service-only" in str(info.value) and "add" in str(info.value)
        assert c.compute("add", 1, 1) == 2  # the connection is fine afterwards


def test_service_only_has_no_classic_access(service_only: rpycsvc.Server) -> None:
    with rpycsvc.connect(service_only.address) as c, \
            pytest.raises(AttributeError, match="service-only"):
        c.modules  # noqa: B018
    host, port = service_only.address.rsplit(":", 1)
    plain = rpyc.connect(host, int(port))
    try:
        with pytest.raises(AttributeError):
            plain.root.getmodule("os")
        with pytest.raises(PermissionError, match="service-only"):
            plain.root.compute("os:getpid")
    finally:
        plain.close()


def test_plain_rpyc_connect_client_passes_containers(service_only: rpycsvc.Server) -> None:
    """rpyc.connect (not classic) allows the server only "safe" attributes of its objects;
    lists, tuples, dicts and sets still arrive by value."""
    host, port = service_only.address.rsplit(":", 1)
    plain = rpyc.connect(host, int(port))
    try:
        assert plain.root.compute("add", 2, 2) == 4
        assert plain.root.compute("describe", [1, (2, 3)], {"k": b"v"}, {4}) == (
            "list", "dict", "set")
        assert plain.root.compute("add", (1,), (2,)) == (1, 2)
    finally:
        plain.close()
