"""Environment checks: client and server say their Python and cloudpickle versions; code sent
by value to a server that can't rebuild it fails on the client, before anything runs, with
``EnvironmentMismatchError``; installed packages a task refers to by reference are compared,
and a version difference is logged once per package and server.

Servers are real: in-process, a subprocess of this interpreter, or a subprocess of another
CPython minor version (a virtualenv next to this one with rpyc and cloudpickle, as nox and
``/work/venvs`` make them; skipped where there is none).
"""

from __future__ import annotations

import glob
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest

import rpycsvc
from rpycsvc.client.environment import by_value_conflict, wait_checked
from rpycsvc.client.local import read_address
from rpycsvc.client.pickles import candidate_modules, holds_code_by_value, pickle_globals
from rpycsvc.errors import EnvironmentMismatchError
from rpycsvc.protocol.serialization import dumps, dumps_function
from tests.support.servers import REPO, ServerProcess

WAIT = 60.0
HERE = sys.version_info[:2]
LOGGER = "rpycsvc.environment"


def double(x: int) -> int:
    return 2 * x


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


# -- what a pickle holds ------------------------------------------------------------------
def test_code_by_value_is_told_from_references() -> None:
    assert holds_code_by_value(dumps_function(lambda x: x + 1))
    assert not holds_code_by_value(dumps_function(os.path.join))
    assert not holds_code_by_value(dumps_function(double))  # importable: by reference
    # cloudpickle's own public functions, by reference, are not code sent by value
    assert not holds_code_by_value(dumps_function(cloudpickle.dumps))
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        assert holds_code_by_value(dumps_function(double))
        assert holds_code_by_value(dumps(((Point(1),), {}))[0])  # a class by value
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert not holds_code_by_value(dumps(((Point(1),), {}))[0])
    # data cloudpickle rebuilds with helpers of its own, no code: only another major of
    # cloudpickle can't load it
    keys = dumps((({1: 2}.keys(),), {}))[0]
    assert not holds_code_by_value(keys) and holds_code_by_value(keys, any_helper=True)


def test_pickle_globals_and_candidate_modules() -> None:
    blob = dumps_function(os.path.join)
    assert ("posixpath", "join") in pickle_globals(blob) or \
        ("ntpath", "join") in pickle_globals(blob)
    head = dumps(((Point(3), [1, 2]), {"k": "v"}))[0]
    assert (__name__, "Point") in pickle_globals(head)
    assert "tests" in candidate_modules(head)
    assert candidate_modules(dumps(((1, "numpy"), {}))[0]) == set()  # no global at all


@pytest.mark.parametrize("client, server, differs", [
    ({"python": "3.11.7", "cloudpickle": "3.1.3"}, {"python": "3.11.2", "cloudpickle": "3.0.0"},
     None),
    ({"python": "3.11.7", "cloudpickle": "3.1.3"}, {"python": "3.9.18", "cloudpickle": "3.1.3"},
     "Python 3.9"),
    ({"python": "3.11.7", "cloudpickle": "3.1.3"}, {"python": "3.11.7", "cloudpickle": "2.2.1"},
     "cloudpickle 2.2.1"),
])
def test_what_code_sent_by_value_needs(client: dict[str, str], server: dict[str, str],
                                       differs: str | None) -> None:
    """Same Python minor (the micro may differ) and same cloudpickle major."""
    said = by_value_conflict(client, server)
    assert said is None if differs is None else (said is not None and differs in said)


# -- the hello --------------------------------------------------------------------------------
def test_both_sides_say_python_and_cloudpickle(server: rpycsvc.Server) -> None:
    with rpycsvc.connect(server.address) as c:
        assert c.server_info["python"] == platform.python_version()
        assert c.server_info["cloudpickle"] == cloudpickle.__version__
        stats = c.stats()
        assert stats["cloudpickle_version"] == cloudpickle.__version__
        # same versions: code sent by value runs
        assert c.compute(lambda x: x * 3, 5) == 15
        assert c.submit(lambda: "ok").result(timeout=WAIT) == "ok"


# -- a server of another Python minor version -------------------------------------------------
def _python_minor(exe: str) -> tuple[int, int] | None:
    """The minor version of ``exe`` if it can run an rpycsvc server from this checkout."""
    try:
        out = subprocess.run(
            [exe, "-c", "import sys, rpyc, cloudpickle; print(*sys.version_info[:2])"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    major, minor = map(int, out.stdout.split())
    return (major, minor) if (major, minor) >= (3, 9) else None


def another_python_with_rpyc() -> tuple[tuple[int, int], str]:
    """A virtualenv's python of another minor version than ours that has rpyc and
    cloudpickle: the siblings of this virtualenv (nox's), the checkout's own, /work/venvs."""
    prefix = Path(sys.prefix)
    candidates = sorted(glob.glob(str(prefix.parent / "*" / "bin" / "python")))
    candidates += [str(REPO / ".venv" / "bin" / "python"),
                   *sorted(glob.glob(str(REPO / ".nox" / "*" / "bin" / "python"))),
                   *sorted(glob.glob("/work/venvs/*/bin/python"))]
    for exe in candidates:
        if Path(exe).parent.parent == prefix:
            continue
        version = _python_minor(exe)
        if version is not None and version != HERE:
            return version, exe
    pytest.skip(f"no virtualenv of a CPython >= 3.9 other than {HERE} with rpyc installed")


class OtherPythonServer(ServerProcess):
    """``rpycsvc serve`` run by another interpreter, from this checkout."""

    def __init__(self, exe: str, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [exe, "-m", "rpycsvc.cli", "serve", "--port", "0", "-q", "--workers", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(REPO))
        try:
            self.address = read_address(self.proc, timeout)
        except BaseException:
            self.stop()
            raise
        self.port = int(self.address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def other() -> Iterator[tuple[tuple[int, int], OtherPythonServer]]:
    version, exe = another_python_with_rpyc()
    srv = OtherPythonServer(exe)
    try:
        yield version, srv
    finally:
        srv.stop()


def finished(c: rpycsvc.Client) -> int:
    stats = c.stats()
    return int(stats["tasks_done"]) + int(stats["tasks_failed"])


def test_another_minor_version_refuses_code_sent_by_value(
        other: tuple[tuple[int, int], OtherPythonServer],
        caplog: pytest.LogCaptureFixture) -> None:
    version, srv = other
    there, here = "{}.{}".format(*version), "{}.{}".format(*HERE)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        c = rpycsvc.connect(srv.address, output="discard")
    try:
        said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
        assert any(srv.address in m and "EnvironmentMismatchError" in m for m in said), said
        assert c.server_info["python"].startswith(there + ".")
        before = finished(c)
        # compute, submit, and a lambda among the arguments
        with pytest.raises(EnvironmentMismatchError) as info:
            c.compute(lambda x: x + 1, 1)
        with pytest.raises(EnvironmentMismatchError):
            c.submit(lambda: 1)
        with pytest.raises(EnvironmentMismatchError, match="arguments holding"):
            c.compute("builtins:list", map(lambda x: x, [1]))
        message = str(info.value)
        assert f"runs Python {there} (this client runs {here})" in message
        assert f"client: Python {platform.python_version()}" in message
        assert "python='/path/to/python" in message and '"module:function"' in message
        assert info.value.address == srv.address
        # nothing reached a worker, and everything else works across versions
        assert finished(c) == before
        assert tuple(c.modules.sys.version_info[:2]) == version
        assert c.eval("2 ** 10") == 1024
        assert c.compute("math:factorial", 6) == 720
        assert c.submit("operator:add", b"ab", b"cd").result(timeout=WAIT) == b"abcd"
        assert c.compute(double, 21) == 42  # an importable function: by reference
        assert c.compute("builtins:list", {1: 2}.keys()) == [1]  # cloudpickle's data helper
    finally:
        c.close()


def test_a_mixed_cluster_sends_code_by_value_where_it_runs(
        other: tuple[tuple[int, int], OtherPythonServer], server: rpycsvc.Server) -> None:
    """Servers of this Python and of another: tasks holding code sent by value all go to
    the former (none fails), import-path tasks anywhere; a broadcast, meant for every
    server, fails on the other one with EnvironmentMismatchError."""
    _version, srv = other
    # (the other server first: it is the one an idle cluster picks when loads are equal)
    with rpycsvc.Cluster([srv.address, server.address], output="discard", retries=3) as cluster:
        futs = [cluster.submit(lambda i: (tuple(sys.version_info[:2]), i), i) for i in range(24)]
        assert [f.result(timeout=WAIT) for f in futs] == [(HERE, i) for i in range(24)]
        assert {f.address for f in futs} == {server.address}
        assert sorted(cluster.map(lambda x: x * x, range(10), chunksize=1,
                                  timeout=WAIT)) == [x * x for x in range(10)]
        assert cluster.submit("math:factorial", 4).result(timeout=WAIT) == 24
        results = cluster.broadcast(lambda: 7, timeout=WAIT)
        assert results.succeeded == {server.address: 7}
        assert isinstance(results.failed[srv.address], EnvironmentMismatchError)


def test_a_cluster_of_other_versions_fails_it_once(
        other: tuple[tuple[int, int], OtherPythonServer]) -> None:
    """No server can rebuild it: the task fails (never re-run, whatever ``retries`` says),
    and the server stays in the cluster for everything else."""
    version, srv = other
    with rpycsvc.Cluster([srv.address], output="discard", retries=3) as cluster:
        fut = cluster.submit(lambda: 7)
        with pytest.raises(EnvironmentMismatchError):
            fut.result(timeout=WAIT)
        assert cluster.submit("math:factorial", 3).result(timeout=WAIT) == 6
        there = cluster.submit("platform:python_version").result(timeout=WAIT)
        assert there.startswith("{}.{}.".format(*version))


# -- versions of installed packages -----------------------------------------------------------
def make_distribution(root: Path, module: str, dist: str, version: str) -> None:
    """An installed distribution ``dist`` of ``version`` providing ``module``."""
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text(
        f"VERSION = {version!r}\n\ndef version():\n    return VERSION\n")
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(module + "\n")


@pytest.fixture
def probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           server_process: type[ServerProcess]) -> Iterator[tuple[ServerProcess, object, object]]:
    """``rpycsvc_envprobe`` 1.0 here and 2.0 on the server; ``rpycsvc_envsame`` 1.0 on both."""
    mine, theirs = tmp_path / "client", tmp_path / "server"
    make_distribution(mine, "rpycsvc_envprobe", "rpycsvc-envprobe", "1.0")
    make_distribution(theirs, "rpycsvc_envprobe", "rpycsvc-envprobe", "2.0")
    for root in (mine, theirs):
        make_distribution(root, "rpycsvc_envsame", "rpycsvc-envsame", "1.0")
    monkeypatch.syspath_prepend(str(mine))
    import importlib

    probe = importlib.import_module("rpycsvc_envprobe")
    same = importlib.import_module("rpycsvc_envsame")
    try:
        srv = server_process("--workers", "1",
                             env={"PYTHONPATH": f"{theirs}{os.pathsep}{REPO}"})
        yield srv, probe, same
    finally:
        for name in ("rpycsvc_envprobe", "rpycsvc_envsame"):
            sys.modules.pop(name, None)


def probe_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING
            and "rpycsvc-env" in r.getMessage()]


@pytest.mark.parametrize("path", ["submit", "compute"])
def test_a_package_of_another_version_is_warned_about_once(
        probes: tuple[ServerProcess, object, object], caplog: pytest.LogCaptureFixture,
        path: str) -> None:
    srv, probe, same = probes
    with caplog.at_level(logging.WARNING, logger=LOGGER), \
            rpycsvc.connect(srv.address, output="discard") as c:
        for _ in range(3):
            if path == "submit":
                assert c.submit(probe.version).result(timeout=WAIT) == "2.0"  # type: ignore[attr-defined]
                assert c.submit(same.version).result(timeout=WAIT) == "1.0"  # type: ignore[attr-defined]
            else:
                assert c.compute(probe.version) == "2.0"  # type: ignore[attr-defined]
                assert c.compute(same.version) == "1.0"  # type: ignore[attr-defined]
        assert wait_checked(WAIT)
    said = probe_warnings(caplog)
    assert len(said) == 1, said
    assert srv.address in said[0]
    assert "rpycsvc-envprobe 1.0" in said[0] and "rpycsvc-envprobe 2.0" in said[0]


def test_a_package_in_the_arguments_is_compared_too(
        probes: tuple[ServerProcess, object, object], caplog: pytest.LogCaptureFixture) -> None:
    """An argument whose pickle refers to an installed package (as a numpy array refers to
    numpy) counts, not only the task function."""
    srv, probe, _same = probes
    with caplog.at_level(logging.WARNING, logger=LOGGER), \
            rpycsvc.connect(srv.address, output="discard") as c:
        assert c.submit("builtins:callable", probe.version).result(timeout=WAIT)  # type: ignore[attr-defined]
        assert wait_checked(WAIT)
    said = probe_warnings(caplog)
    assert len(said) == 1 and "rpycsvc-envprobe 2.0" in said[0], said
