"""Drop-in parity with ``rpyc_classic`` (issue 17), against real servers: the ``SLAVE``
name in a registry, RPyC's classic attribute rules (no ``exposed_`` lookup on arbitrary
objects), ``--ipv6`` without ``--host``, ``rpycsvc_classic -m oneshot``'s banner, ``-q``,
a readable refusal for plain clients of an authkey server, and settings that make no sense
(negative ``--workers``, service-only mode with nothing to serve)."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rpyc
from rpyc.core.service import ClassicClient
from rpyc.utils.factory import connect_by_service
from rpyc.utils.registry import TCPRegistryClient

import rpycsvc
from tests.support.servers import REPO, ServerProcess, running_server
from tests.test_registry import RegistryProcess, register_args, wait_for

WAIT = 30.0
AUTHKEY = "drop-in-secret-key"
SERVE = (sys.executable, "-m", "rpycsvc.cli", "serve")
CLASSIC = (sys.executable, str(REPO / "bin" / "rpycsvc_classic"))
ENDPOINTS = "tests.support.sample_endpoints"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A command line expected to end by itself (a refusal, --help)."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=WAIT,
                          cwd=str(REPO), stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))


def read_lines(proc: subprocess.Popen[bytes], count: int, timeout: float = WAIT) -> list[str]:
    """The first ``count`` lines of ``proc``'s stdout, waiting at most ``timeout``."""
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while buf.count(b"\n") < count:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"no {count} lines within {timeout} s; got {buf!r}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise EOFError(f"stdout ended after {buf!r} (exit {proc.wait(WAIT)})")
            buf += chunk
    return buf.decode().splitlines()[:count]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(WAIT)
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()


# -- the SLAVE name ----------------------------------------------------------------------------

def test_rpyc_discover_slave_finds_a_classic_server(server_process: type[ServerProcess]) -> None:
    registry = RegistryProcess("--mode", "TCP")
    try:
        classic = server_process(*register_args(registry))
        service_only = server_process(*register_args(registry), "--no-classic",
                                      "--endpoints", ENDPOINTS)
        # rpycsvc's own lookup lists each server once, under whatever names it registered
        wait_for(registry.port, {classic.address, service_only.address})
        registrar = TCPRegistryClient("127.0.0.1", port=registry.port, timeout=5)
        # A service-only server runs no client code, so it doesn't pretend to be a SLAVE.
        assert set(rpyc.discover("SLAVE", registrar=registrar)) == {("127.0.0.1",
                                                                     classic.port)}
        conn = connect_by_service("SLAVE", registrar=registrar, service=ClassicClient)
        try:
            assert conn.modules.os.getpid() == classic.pid
            assert conn.root.get_service_name() == "CLASSICCOMPUTE"
            assert tuple(conn.root.get_service_aliases()) == ("CLASSICCOMPUTE", "SLAVE")
        finally:
            conn.close()
    finally:
        registry.stop()


# -- RPyC's classic attribute rules --------------------------------------------------------------

@pytest.fixture(scope="module")
def classic_server() -> Iterator[ServerProcess]:
    proc = ServerProcess("--workers", "1", "--endpoints", ENDPOINTS,
                         "--service", "tests.support.dropin_service:Tally")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def conn(classic_server: ServerProcess) -> Iterator[Any]:
    c = rpyc.classic.connect("127.0.0.1", classic_server.port)
    try:
        yield c
    finally:
        c.close()


def test_a_missing_attribute_is_not_answered_by_its_exposed_twin(conn: Any) -> None:
    conn.execute("class Twin:\n    exposed_foo = 42\n")
    twin = conn.eval("Twin()")
    with pytest.raises(AttributeError):
        twin.foo  # noqa: B018 (rpyc_classic: AttributeError; it used to return 42)
    assert twin.exposed_foo == 42  # asked for by its own name, it is there


def test_reading_an_attribute_does_not_probe_exposed_names(conn: Any) -> None:
    conn.execute("import unittest.mock\nmock = unittest.mock.MagicMock()")
    conn.eval("mock").foo  # noqa: B018
    # Each probe of exposed_foo would have created a child mock of that name.
    assert conn.eval("tuple(sorted(mock._mock_children))") == ("foo",)


def test_plain_clients_still_call_the_compute_methods(classic_server: ServerProcess,
                                                      conn: Any) -> None:
    plain = rpyc.connect("127.0.0.1", classic_server.port)  # not classic: a VoidService client
    try:
        for root in (plain.root, conn.root):
            assert root.compute("add", 2, 3) == 5
            assert root.compute("math:factorial", 5) == 120
            assert root.stats()["pid"] == classic_server.pid
            assert root.ping(7) == 7 and root.exposed_ping(8) == 8  # the old names work too
            assert "add" in root.endpoints()
    finally:
        plain.close()
    with rpycsvc.connect(classic_server.address) as c:  # our client uses them all
        assert c.compute(abs, -4) == 4 and c.stats()["pid"] == classic_server.pid


def test_hosted_objects_keep_the_rpyc_service_convention(conn: Any) -> None:
    q = conn.root.queue("dropin")
    q.put((1, "two"))
    assert q.get(5) == (1, "two") and q.empty()
    first = conn.root.tally.add(2)
    assert conn.root.tally.add(3) == first + 3  # exposed_add, by its plain name


# -- --ipv6, the oneshot banner, -q ------------------------------------------------------------

def ipv6_loopback_missing() -> str:
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"this machine can't bind ::1 ({exc})"
    return ""


@pytest.mark.skipif(bool(ipv6_loopback_missing()), reason=ipv6_loopback_missing() or "-")
def test_ipv6_without_host_binds_ipv6_loopback(server_process: type[ServerProcess]) -> None:
    proc = server_process("--ipv6", "--workers", "1")
    assert proc.address == f"[::1]:{proc.port}"
    with rpycsvc.connect(proc.address) as c:
        assert c.compute(abs, -3) == 3
    plain = rpyc.classic.connect("::1", proc.port, ipv6=True)
    try:
        assert plain.modules.os.getpid() == proc.pid
    finally:
        plain.close()


def test_ipv6_with_an_ipv4_host_is_refused_with_the_fix() -> None:
    res = run_cli(*SERVE, "--ipv6", "--host", "127.0.0.1", "--port", "0")
    assert res.returncode == 2, res.stderr
    assert "--ipv6" in res.stderr and "'127.0.0.1'" in res.stderr and "::1" in res.stderr


def _oneshot(cmd: list[str]) -> None:
    """Start ``cmd`` (a classic server in oneshot mode), parse its banner as RPyC's own
    tests/test_teleportation.py does, use the one connection, and see the server exit 0."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=str(REPO),
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        banner, where = read_lines(proc, 2)
        assert banner == "rpyc-oneshot"
        host, port = where.strip().split("\t")
        c = rpyc.classic.connect(host, int(port))
        try:
            assert c.modules.os.getpid() == proc.pid
        finally:
            c.close()
        assert proc.wait(WAIT) == 0
    finally:
        stop(proc)


def test_rpyc_classic_oneshot_banner_control() -> None:
    """The control: what rpyc_classic itself prints (if this fails, RPyC changed)."""
    _oneshot([sys.executable, "-c", "from rpyc.cli.rpyc_classic import main; main()",
              "-m", "oneshot", "-p", "0", "-q"])


def test_rpycsvc_classic_oneshot_prints_what_rpyc_classic_prints() -> None:
    _oneshot([*CLASSIC, "-m", "oneshot", "-p", "0", "-q", "--workers", "1"])


def test_quiet_logs_errors_only(server_process: type[ServerProcess], tmp_path: Path) -> None:
    logs = {}
    for name, flags in (("verbose", ("-v",)), ("quiet", ())):  # ServerProcess always adds -q
        logfile = tmp_path / f"{name}.log"
        proc = server_process("--workers", "1", "--logfile", str(logfile), *flags,
                              env={"RPYCSVC_AUTHKEY": AUTHKEY})
        with pytest.raises(rpycsvc.AuthenticationError):
            rpycsvc.connect(proc.address, authkey="not-the-right-key", timeout=10)
        assert proc.stop() == 0  # (the log is complete once the server has exited)
        logs[name] = logfile.read_text()
    assert "WARNING" in logs["verbose"] and "wrong authkey" in logs["verbose"]  # the control
    assert logs["quiet"] == ""


# -- a plain RPyC client and an authkey ------------------------------------------------------

def test_plain_rpyc_client_of_an_authkey_server_is_told_why() -> None:
    with running_server(workers=1, authkey=AUTHKEY) as srv:
        with pytest.raises(PermissionError, match="requires an authkey") as info:
            rpyc.classic.connect("127.0.0.1", srv.port)
        assert f"rpycsvc.connect({srv.address!r}, authkey=...)" in str(info.value)
        plain = rpyc.connect("127.0.0.1", srv.port)  # sends nothing until its first call
        try:
            with pytest.raises(PermissionError, match="requires an authkey"):
                plain.root.stats()
        finally:
            plain.close()
        with rpycsvc.connect(srv.address, authkey=AUTHKEY) as c:  # the way in still works
            assert c.compute(abs, -5) == 5 and c.modules.os.getpid() == os.getpid()


def test_plain_rpyc_client_over_tls_is_told_why_too(tmp_path: Path) -> None:
    from tests.support.certs import make_certs

    certs = make_certs(tmp_path)
    with running_server(workers=1, authkey=AUTHKEY, ssl_keyfile=str(certs.server_key),
                        ssl_certfile=str(certs.server_cert)) as srv:
        with pytest.raises(PermissionError, match="requires an authkey"):
            rpyc.classic.ssl_connect("127.0.0.1", srv.port, ca_certs=str(certs.ca))
        from rpycsvc.protocol.handshake import client_ssl_context

        with rpycsvc.connect(srv.address, authkey=AUTHKEY,
                             ssl=client_ssl_context(ca=str(certs.ca))) as c:
            assert c.compute(abs, -6) == 6


# -- settings that make no sense ----------------------------------------------------------------

@pytest.mark.parametrize("cmd", [SERVE, CLASSIC], ids=["rpycsvc serve", "rpycsvc_classic"])
def test_negative_workers_is_refused_naming_it(cmd: tuple[str, ...]) -> None:
    res = run_cli(*cmd, "--port", "0", "--workers", "-1")
    assert res.returncode == 2 and "--workers" in res.stderr and "-1" in res.stderr, res.stderr
    res = run_cli(*cmd, "--port", "0", env={"RPYCSVC_WORKERS": "-2"})
    assert res.returncode == 2 and "RPYCSVC_WORKERS" in res.stderr and "-2" in res.stderr, \
        res.stderr
    assert "Traceback" not in res.stderr


def test_workers_0_means_one_per_core(server_process: type[ServerProcess]) -> None:
    help_text = " ".join(run_cli(*SERVE, "--help").stdout.split())
    assert "0 means one per core" in help_text
    proc = server_process("--workers", "0")
    with rpycsvc.connect(proc.address) as c:
        assert c.stats()["workers"] == (os.cpu_count() or 1)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_service_only_with_nothing_to_serve_is_refused(
        how: str, server_process: type[ServerProcess]) -> None:
    args, env = ((["--no-classic"], {}) if how == "flag"
                 else ([], {"RPYCSVC_CLASSIC": "false"}))
    res = run_cli(*SERVE, "--port", "0", "--workers", "1", *args, env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "service-only" in res.stderr and "--endpoints" in res.stderr \
        and "--service" in res.stderr and "Traceback" not in res.stderr
    # with something to serve, it starts
    proc = server_process("--workers", "1", *args, "--endpoints", ENDPOINTS, env=env)
    with rpycsvc.connect(proc.address) as c:
        assert c.compute("add", 1, 2) == 3


def test_deploy_refuses_service_only_with_nothing_to_serve() -> None:
    # Refused before anything starts on a host: the host name is never looked up.
    with pytest.raises(rpycsvc.ConfigError, match="nothing to serve"):
        rpycsvc.deploy(["host.invalid"], classic=False)
