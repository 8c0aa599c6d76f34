"""The network-namespace helper: hosts reach each other, a cut fails fast, cleanup is total.

Every connection here runs between two namespaces the test created (``exec_argv``); nothing
connects from the root namespace to a 10.77 address.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from rpycsvc.deployment.bootstrap import start_remote
from tests.support.echo_entry import exchange
from tests.support.netns import (
    PREFIX,
    NetnsNetwork,
    exec_argv,
    list_namespaces,
    netns_available,
    sweep_stale,
)
from tests.support.sshd import SshServer, pid_alive, sshd_available

pytestmark = pytest.mark.netns

ECHO_SERVER = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(8)
print("READY", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.settimeout(10)
        conn.sendall(conn.recv(1024))
"""

ECHO_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
        s.settimeout(3)
        s.sendall(b"ping")
        print(s.recv(1024).decode())
except OSError as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
"""


@pytest.fixture(scope="module")
def net() -> Iterator[NetnsNetwork]:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    network = NetnsNetwork(hosts=3)
    try:
        network.start()
        yield network
    finally:
        network.close()


def run_client(net: NetnsNetwork, host: str, port: int) -> tuple[int, str, float]:
    began = time.monotonic()
    proc = subprocess.run(
        [*exec_argv(net.client), sys.executable, "-c", ECHO_CLIENT, net.address(host), str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode, proc.stdout.strip() + proc.stderr.strip(), time.monotonic() - began


@pytest.fixture
def echo_server(net: NetnsNetwork) -> Iterator[tuple[str, int]]:
    host, port = net.hosts[1], 7007
    argv = [*exec_argv(host), sys.executable, "-c", ECHO_SERVER, net.address(host), str(port)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        # Bounded: the server prints READY once listening; if it dies we read EOF.
        line = _readline(proc, timeout=20)
        assert line == "READY\n", f"echo server did not start: {line!r}"
        yield host, port
    finally:
        proc.kill()  # `ip netns exec` execs: this pid is the python we started
        proc.wait(10)


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the child's stdout, or "" if none came within ``timeout``."""
    out = proc.stdout
    assert out is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(out.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


def test_echo_between_namespaces_cut_and_restore(
    net: NetnsNetwork, echo_server: tuple[str, int]
) -> None:
    host, port = echo_server
    assert run_client(net, host, port)[:2] == (0, "ping")

    net.cut(host)
    code, out, elapsed = run_client(net, host, port)
    assert code == 3 and "No route to host" in out, out
    assert elapsed < 3, f"a connect to a cut host took {elapsed:.2f} s"
    # The other hosts are still reachable (connection refused: nobody listens there).
    code, out, _ = run_client(net, net.hosts[0], port)
    assert code == 3 and "ConnectionRefused" in out, out

    net.restore(host)
    deadline = time.monotonic() + 10
    while (result := run_client(net, host, port))[0] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert result[:2] == (0, "ping"), result


def test_members_and_bad_names(net: NetnsNetwork) -> None:
    assert len(net.hosts) == 3 and len(set(net.namespaces)) == 5
    assert {net.address(ns) for ns in [net.client, *net.hosts]} == {
        "10.77.0.2",
        "10.77.0.11",
        "10.77.0.12",
        "10.77.0.13",
    }
    with pytest.raises(ValueError, match="not a member"):
        net.cut("some-other-namespace")
    assert exec_argv("x") == ["ip", "netns", "exec", "x"]


def test_cleanup_leaves_no_namespace_of_ours() -> None:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    with NetnsNetwork(hosts=2) as network:
        assert set(network.namespaces) <= set(list_namespaces())
    assert [ns for ns in list_namespaces() if ns.startswith(network.prefix)] == []


@pytest.mark.ssh
def test_sshd_and_bootstrap_inside_namespaces(net: NetnsNetwork) -> None:
    reason = sshd_available()
    if reason:
        pytest.skip(reason)
    host = net.hosts[0]
    with SshServer(netns=host, address=net.address(host)) as srv:
        argv = srv.ssh_argv(netns=net.client)
        proc = subprocess.run([*argv, "echo ok"], capture_output=True, timeout=30)
        assert proc.stdout == b"ok\n", proc.stderr
        remote = start_remote(
            argv, "tests.support.echo_entry:main", ["tests.support.echo_entry"], timeout=30
        )
        try:
            pid = int(exchange(remote.stdin, remote.stdout, None, timeout=30))
            assert exchange(remote.stdin, remote.stdout, b"across", timeout=30) == b"across"
        finally:
            assert remote.close(10) == 0
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pid_alive(pid)


def test_sweep_stale_removes_namespaces_of_dead_runs() -> None:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    # 4194305 is above the kernel's largest possible pid: that "run" is certainly dead.
    stale = f"{PREFIX}4194305-{secrets.token_hex(3)}-h1"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    try:
        assert stale in sweep_stale()
        assert stale not in list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, timeout=10)
