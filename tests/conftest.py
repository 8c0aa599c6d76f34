"""Fixtures: real servers on 127.0.0.1, port 0, torn down in finally."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

import rpycsvc
from tests.support.certs import Certs, make_certs
from tests.support.servers import ServerProcess, running_server
from tests.support.sshd import SshServer, sshd_available


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C must work in the suite however it was started.

    A non-interactive shell starts background jobs (``cmd &``, as CI runs the Python matrix)
    with SIGINT ignored, and every process started from them inherits that: the tests that
    press Ctrl-C (the REPL, ``rpycsvc deploy``) would see nothing happen. Python's own
    handler here gives the children the default disposition again (handlers reset on exec).
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def server() -> Iterator[rpycsvc.Server]:
    """One in-process server (2 workers) shared by a test module."""
    with running_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def service_only() -> Iterator[rpycsvc.Server]:
    """A service-only server (--no-classic, 1 worker) offering the sample endpoints."""
    with running_server(endpoints=["tests.support.sample_endpoints"], workers=1,
                        classic=False) as srv:
        yield srv


@pytest.fixture
def client(server: rpycsvc.Server) -> Iterator[rpycsvc.Client]:
    c = rpycsvc.connect(server.address, output="capture")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def server_process() -> Iterator[type[ServerProcess]]:
    """A factory for subprocess servers; every one started is stopped at teardown."""
    started: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def __init__(self, *args: str, **kw: object) -> None:
            super().__init__(*args, **kw)  # type: ignore[arg-type]
            started.append(self)

    try:
        yield Tracked
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    """A private sshd on 127.0.0.1 for a test module (skipped where sshd is missing)."""
    reason = sshd_available()
    if reason:
        pytest.skip(reason)
    srv = SshServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, server and client certificates made as a real CA would (tests/support/certs)."""
    return make_certs(tmp_path_factory.mktemp("certs"))
