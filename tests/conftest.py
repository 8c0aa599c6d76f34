"""Fixtures: real servers on 127.0.0.1, port 0, torn down in finally."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import rpycsvc
from tests.support.servers import ServerProcess, running_server
from tests.support.sshd import SshServer, sshd_available


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
