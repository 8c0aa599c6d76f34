"""What differs between the CPythons rpycsvc supports (3.9 to 3.13), client and server.

Each test holds on every interpreter of the matrix (``nox``; ``.ci/run`` runs 3.9, the default
one and 3.13): timeouts caught by both ``TimeoutError`` classes (they differ before 3.11),
bytes-like arguments from plain RPyC clients (PEP 688 buffers from 3.12), certificates under
strict X.509 verification (the default from 3.13), and deploying to a host whose Python is
another version than the client's.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import ssl
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rpyc

import rpycsvc
from rpycsvc.deployment.bundle import build_bundle
from rpycsvc.deployment.loader import host_pythons, remote_command
from rpycsvc.errors import EnvironmentMismatchError
from rpycsvc.protocol.handshake import client_ssl_context
from tests.support.certs import Certs, make_weak_chain
from tests.support.servers import running_server
from tests.support.sshd import SshServer

WAIT = 60.0
HERE = sys.version_info[:2]


def host_port(srv: rpycsvc.Server) -> tuple[str, int]:
    host, port = srv.address.rsplit(":", 1)
    return host, int(port)


# -- 1. every rpycsvc timeout is both TimeoutError classes ------------------------------------
@pytest.fixture(scope="module")
def cluster(server: rpycsvc.Server) -> Iterator[rpycsvc.Cluster]:
    with rpycsvc.Cluster([server.address], output="discard") as c:
        yield c


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "as-completed"])
def test_map_deadline_is_caught_by_both_timeout_errors(cluster: rpycsvc.Cluster,
                                                       ordered: bool) -> None:
    """``except TimeoutError`` catches a map's deadline on 3.9 and 3.10 too (before 3.11
    ``concurrent.futures.TimeoutError`` is another class), and so does the futures one."""
    # One 30 s task and a 2 s deadline: nothing else has to finish in time, so a busy
    # machine can't fail this (the issue's [0, 30] needed the first task within the deadline).
    began = time.monotonic()
    it = cluster.map(time.sleep, [30], chunksize=1, timeout=2.0, ordered=ordered)
    try:
        try:
            next(it)
        except TimeoutError as exc:  # the builtin one
            caught: BaseException = exc
        else:
            pytest.fail("the map's deadline passed without an error")
        assert time.monotonic() - began < 25, "the deadline, not the 30 s task, ended the wait"
        assert isinstance(caught, concurrent.futures.TimeoutError)
        assert isinstance(caught, rpycsvc.RpycsvcTimeoutError)
    finally:
        it.close()  # type: ignore[attr-defined]


def test_map_reduce_deadline_is_caught_by_both_timeout_errors(cluster: rpycsvc.Cluster) -> None:
    with pytest.raises(TimeoutError) as info:
        cluster.map_reduce(time.sleep, lambda a, b: a, [0, 30], chunksize=1, timeout=1.0)
    assert isinstance(info.value, concurrent.futures.TimeoutError)
    assert isinstance(info.value, rpycsvc.RpycsvcTimeoutError)


def test_every_rpycsvc_timeout_type_is_both_timeout_errors() -> None:
    for cls in (rpycsvc.RpycsvcTimeoutError, rpycsvc.TaskTimeoutError):
        assert issubclass(cls, TimeoutError) and issubclass(cls, concurrent.futures.TimeoutError)
        with pytest.raises(concurrent.futures.TimeoutError):
            raise cls("x")


# -- 2. bytes-like arguments from a plain RPyC client -----------------------------------------
ALL_BYTES = bytes(range(256)) + b"'\"\\\n" + "é".encode()


def test_plain_rpyc_client_passes_a_bytearray(server: rpycsvc.Server) -> None:
    """``bytes(netref)`` fails from 3.12 on (the proxy's ``__buffer__``); the server copies
    a bytearray argument another way, byte-exact."""
    host, port = host_port(server)
    conn = rpyc.connect(host, port)
    try:
        assert conn.root.compute("builtins:len", bytearray(b"xyz")) == 3
        # bytes come back by value: every byte value, quotes and backslashes survive
        assert conn.root.compute("builtins:bytes", bytearray(ALL_BYTES)) == ALL_BYTES
        big = bytearray(os.urandom(256 * 1024))
        assert conn.root.compute("zlib:crc32", big) == zlib.crc32(big)
    finally:
        conn.close()


def test_plain_rpyc_client_passes_a_bytearray_to_an_endpoint(
        service_only: rpycsvc.Server) -> None:
    """Service-only mode counts a bytearray as plain data."""
    host, port = host_port(service_only)
    conn = rpyc.connect(host, port)
    try:
        assert conn.root.compute("add", b"", bytearray(ALL_BYTES)) == ALL_BYTES
    finally:
        conn.close()


# -- 3. certificates under strict X.509 verification ------------------------------------------

@pytest.fixture(scope="module")
def weak_chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_weak_chain(tmp_path_factory.mktemp("weak"))


def strict_context(ca: Path) -> ssl.SSLContext:
    ctx = client_ssl_context(ca=str(ca))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # already on from 3.13
    return ctx


def test_suite_certificates_pass_strict_verification(certs: Certs) -> None:
    with running_server(workers=1, ssl_keyfile=str(certs.server_key),
                        ssl_certfile=str(certs.server_cert), ssl_cafile=str(certs.ca)) as srv:
        ctx = strict_context(certs.ca)
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        with rpycsvc.connect(srv.address, ssl=ctx) as c:
            assert c.compute(abs, -7) == 7


CONTEXTS = {
    "strict-flag": strict_context,
    # Python's own default: strict from 3.13 on
    "default": lambda ca: client_ssl_context(ca=str(ca)),
}


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_a_ca_without_key_usage_fails_with_a_clear_error(
        weak_chain: tuple[Path, Path, Path], context: str) -> None:
    if context == "default" and sys.version_info < (3, 13):
        pytest.skip("Python's default context verifies strictly from 3.13 on")
    ca, cert, key = weak_chain
    with running_server(workers=1, ssl_keyfile=str(key), ssl_certfile=str(cert)) as srv, \
            pytest.raises(rpycsvc.AuthenticationError) as info:
        rpycsvc.connect(srv.address, ssl=CONTEXTS[context](ca), timeout=10)
    message = str(info.value)
    assert message.startswith(f"TLS handshake with {srv.address} failed")
    # OpenSSL's reason, what to change, and where the recipe is
    assert "CA cert does not include key usage extension" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert "keyUsage on the CA" in message
    assert 'docs/server.md, section "TLS certificates"' in message
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


def test_a_name_mismatch_says_subject_alt_name(certs: Certs) -> None:
    with running_server(workers=1, ssl_keyfile=str(certs.server_key),
                        ssl_certfile=str(certs.server_cert)) as srv, \
            pytest.raises(rpycsvc.AuthenticationError, match="subjectAltName must list"):
        rpycsvc.connect(srv.address, ssl=strict_context(certs.ca),
                        server_hostname="elsewhere.example", timeout=10)


# -- 4. the host's Python --------------------------------------------------------------------
def interpreters() -> dict[tuple[int, int], str]:
    """Supported CPythons on this machine (PATH and pyenv), by minor version."""
    found: dict[tuple[int, int], str] = {}
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [str(p / "bin" / "python3") for p in sorted(pyenv.glob("3.*"))]
    candidates += [w for m in range(9, 20) if (w := shutil.which(f"python3.{m}"))]
    for exe in candidates:
        if not os.access(exe, os.X_OK):
            continue
        out = subprocess.run([exe, "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            major, minor = map(int, out.stdout.split())
            if (major, minor) >= (3, 9):
                found.setdefault((major, minor), exe)
    return found


def another_python() -> tuple[tuple[int, int], str]:
    """An interpreter of another minor version: the lowest supported one unless that is
    ours, else the newest."""
    others = {v: exe for v, exe in interpreters().items() if v != HERE}
    if not others:
        pytest.skip(f"no CPython >= 3.9 other than {HERE} on this machine")
    version = min(others) if min(others) == (3, 9) else max(others)
    return version, others[version]


def pick_locally(tmp_path: Path, names: dict[str, str]) -> str:
    """Run deploy's default remote command with sh and a PATH holding only ``names``
    (links to interpreters); return the executable the loader reports."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, target in {"sh": "/bin/sh", **names}.items():
        (bindir / name).symlink_to(target)
    frames = b"".join(len(x).to_bytes(8, "big") + x for x in (
        build_bundle(["tests.support.echo_entry"]), b"tests.support.echo_entry:main"))
    proc = subprocess.run(["/bin/sh", "-c", remote_command(None)], input=frames,
                          capture_output=True, timeout=60, env={**os.environ, "PATH": str(bindir)})
    ready = proc.stdout.split(b"\n", 1)[0].decode()
    assert ready.startswith("RPYCSVC-READY "), (proc.returncode, proc.stderr[-2000:])
    return ready.split(" ", 3)[3]


def test_default_remote_python_prefers_the_clients_minor_version(tmp_path: Path) -> None:
    ours = os.path.realpath(sys.executable)
    matching, fallback = host_pythons()
    assert matching == f"python{HERE[0]}.{HERE[1]}" and fallback == "python3"
    exe = pick_locally(tmp_path, {matching: ours, "python3": ours})
    assert exe == str(tmp_path / "bin" / matching)


def test_default_remote_python_falls_back_to_python3(tmp_path: Path) -> None:
    exe = pick_locally(tmp_path, {"python3": os.path.realpath(sys.executable)})
    assert exe == str(tmp_path / "bin" / "python3")


def test_no_remote_python_is_exit_127() -> None:
    """What the shell says for "not found", so deploy's message names the missing python."""
    proc = subprocess.run(["/bin/sh", "-c", remote_command(None)], capture_output=True, timeout=30,
                          env={**os.environ, "PATH": "/nonexistent"})
    assert proc.returncode == 127


def deploy(srv: SshServer, **kw: Any) -> rpycsvc.Cluster:
    return rpycsvc.deploy([srv.alias], ssh_options=["-F", str(srv.config_path)],
                          **{"timeout": 30, **kw})


def pid_and_double(x: int) -> tuple[int, int]:
    return os.getpid(), 2 * x


@pytest.fixture
def by_value() -> Iterator[None]:
    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(module)


@pytest.mark.ssh
def test_deploy_runs_the_hosts_python_of_the_clients_version(
        sshd: SshServer, caplog: pytest.LogCaptureFixture, by_value: None) -> None:
    """The test host has python3.X of this interpreter (tests/support/sshd.py), besides a
    python3 that may be another version: deploy picks the former and says so."""
    with caplog.at_level(logging.INFO, logger="rpycsvc.deploy"):
        cluster = deploy(sshd)
    try:
        assert tuple(cluster[0].modules.sys.version_info[:2]) == HERE
        pid, doubled = cluster.submit(pid_and_double, 21).result(timeout=WAIT)
        assert doubled == 42 and pid != os.getpid()
    finally:
        cluster.close()
    said = [r.getMessage() for r in caplog.records if r.name == "rpycsvc.deploy"]
    assert any(f"the host's python{HERE[0]}.{HERE[1]}" in m and
               f"Python {'.'.join(map(str, sys.version_info[:3]))}" in m for m in said), said


@pytest.mark.ssh
def test_deploy_with_another_minor_version(sshd: SshServer,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """``python=`` another version (the lowest supported one when the client is newer): the
    bootstrap and the server run there, classic access and import-path tasks work, and the
    log warns that tasks sent by value won't."""
    version, exe = another_python()
    with caplog.at_level(logging.INFO, logger="rpycsvc.deploy"):
        cluster = deploy(sshd, python=exe)
    try:
        c = cluster[0]
        assert tuple(c.modules.sys.version_info[:2]) == version
        assert c.eval("2 ** 10") == 1024
        assert cluster.submit("math:factorial", 10).result(timeout=WAIT) == 3628800
        assert sorted(cluster.map("builtins:abs", [-3, 1, -2], timeout=WAIT)) == [1, 2, 3]
        assert c.compute("operator:add", b"ab", b"cd") == b"abcd"
    finally:
        cluster.close()
    warned = [r.getMessage() for r in caplog.records
              if r.name == "rpycsvc.deploy" and r.levelno == logging.WARNING]
    assert any("tasks sent by value" in m and f"python={exe!r}" in m for m in warned), warned


@pytest.mark.ssh
def test_by_value_task_on_another_minor_version_fails_clearly(sshd: SshServer,
                                                              by_value: None) -> None:
    """A function sent by value to a server of another Python minor version fails on the
    client, before anything runs, naming both versions and both fixes; the same server
    still runs tasks named by import path, and the cluster stays usable."""
    version, exe = another_python()
    there, here = "{}.{}".format(*version), "{}.{}".format(*HERE)
    cluster = deploy(sshd, python=exe)
    try:
        with pytest.raises(EnvironmentMismatchError) as info:
            cluster.submit(pid_and_double, 1).result(timeout=WAIT)
        message = str(info.value)
        assert f"Python {there}" in message and f"this client runs {here}" in message
        assert "python=" in message and '"module:function"' in message
        assert isinstance(info.value, rpycsvc.SerializationError)
        assert info.value.server["python"].startswith(there + ".")
        assert info.value.client["python"].startswith(here + ".")
        # a lambda in the arguments is code sent by value too
        with pytest.raises(EnvironmentMismatchError, match="arguments holding"):
            cluster.submit("builtins:map", lambda x: x, [1]).result(timeout=WAIT)
        # the server is fine: import-path tasks still run there
        assert cluster.submit("math:factorial", 5).result(timeout=WAIT) == 120
    finally:
        cluster.close()
