"""Discovery through RPyC's registry: ``rpycsvc registry`` on 127.0.0.1, servers started
with ``--register`` found by :func:`rpycsvc.client.discovery.discover`, ``Cluster.discover`` and
``status --discover``; a stopped server unregisters; a silent client can't stall it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import rpycsvc
from rpycsvc.client.discovery import discover
from rpycsvc.errors import ConnectError
from rpycsvc.server.registry import SERVICE_NAMES, start_registry, stop_registry
from tests.support.servers import REPO, ServerProcess

WAIT = 30.0


class RegistryProcess(ServerProcess):
    """``rpycsvc registry --port 0 --mode TCP`` as a child; address from its first line."""

    def __init__(self, *args: str) -> None:  # not super().__init__: that runs `serve`
        cmd = [sys.executable, "-m", "rpycsvc.cli", "registry", "--port", "0", "-q", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, cwd=str(REPO),
                                     env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.address = self._read_address(WAIT)
        self.port = int(self.address.rsplit(":", 1)[1])


@pytest.fixture
def registry() -> Iterator[RegistryProcess]:
    reg = RegistryProcess("--mode", "TCP")
    try:
        yield reg
    finally:
        reg.stop()


def register_args(reg: RegistryProcess) -> tuple[str, ...]:
    return ("--workers", "1", "--register", "--registry-type", "TCP",
            "--registry-host", "127.0.0.1", "--registry-port", str(reg.port))


def wait_for(registry_port: int, expected: set[str]) -> list[str]:
    """Poll the registry (bounded) until it lists exactly ``expected``; servers register
    from a background thread right after they start listening."""
    deadline = time.monotonic() + WAIT
    found: list[str] = []
    while time.monotonic() < deadline:
        found = discover("127.0.0.1", registry_port, "TCP", timeout=5)
        if set(found) == expected:
            return found
        time.sleep(0.05)
    raise AssertionError(f"registry lists {found}, expected {sorted(expected)}")


def test_registry_binds_loopback_and_stops_on_sigterm(registry: RegistryProcess) -> None:
    assert registry.address.startswith("127.0.0.1:")
    registry.proc.send_signal(signal.SIGTERM)
    assert registry.proc.wait(timeout=WAIT) == 0


def test_round_trip_with_two_servers(registry: RegistryProcess,
                                     server_process: type[ServerProcess]) -> None:
    a = server_process(*register_args(registry))
    b = server_process(*register_args(registry))
    wait_for(registry.port, {a.address, b.address})

    # the advertised addresses are usable: Cluster.discover connects to both and runs there
    with rpycsvc.Cluster.discover(registry_port=registry.port, timeout=10) as cluster:
        assert sorted(cluster.addresses) == sorted([a.address, b.address])
        assert sorted(c.stats()["pid"] for c in cluster.clients) == sorted([a.pid, b.pid])
        assert sorted(cluster.map(abs, [-1, -2, -3, -4])) == [1, 2, 3, 4]

    out = subprocess.run(
        [sys.executable, "-m", "rpycsvc.cli", "status", "--discover", "--json",
         "--registry-port", str(registry.port), "--timeout", "10"],
        capture_output=True, text=True, timeout=WAIT, cwd=str(REPO), stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {r["address"] for r in rows} == {a.address, b.address}
    assert {r["stats"]["pid"] for r in rows} == {a.pid, b.pid}

    # a server that shuts down unregisters itself
    assert b.stop() == 0
    wait_for(registry.port, {a.address})


def test_service_names_are_what_servers_register() -> None:
    from rpyc.utils.helpers import classpartial

    from rpycsvc.server.service import ClassicComputeService, ComputeService

    for cls in (ClassicComputeService, ComputeService):
        # the server registers classpartial(cls, runtime), which keeps the class name
        aliases = classpartial(cls, None).get_service_aliases()
        assert set(aliases) <= set(SERVICE_NAMES)


def test_silent_client_does_not_stall_registry() -> None:
    server, thread = start_registry("127.0.0.1", 0, "TCP")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            # upstream's registry would wait on this connection forever
            assert discover("127.0.0.1", server.port, "TCP", timeout=10) == []
    finally:
        stop_registry(server, thread)
    assert not thread.is_alive()


def test_discover_without_registry_says_so() -> None:
    server, thread = start_registry("127.0.0.1", 0, "TCP")
    port = server.port
    stop_registry(server, thread)  # now nothing listens on that port
    with pytest.raises(ConnectError, match="rpycsvc registry"):
        discover("127.0.0.1", port, "TCP", timeout=2)
    with pytest.raises(ConnectError):
        rpycsvc.Cluster.discover(registry_port=port, timeout=2)
