"""What is deprecated still works for one release, and says so.

Lanes are gone (every task takes one path: task messages inside the client's connection,
relayed by the server to its pool). ``connect(lanes=...)``, ``ServerConfig(lanes=...)`` and
``rpycsvc serve --no-lanes`` are accepted and ignored: the client warns with a
``DeprecationWarning`` pointing at the caller's line, the server logs a warning; tasks run
as without them.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import pytest

import rpycsvc
from tests.support.servers import ServerProcess, running_server

WAIT = 30.0


def runs_tasks(c: rpycsvc.Client) -> None:
    """compute() and submit() run in the server's workers."""
    pid = c.compute(os.getpid)
    assert pid != os.getpid() and pid in c.stats()["worker_pids"]
    assert c.submit(abs, -2).result(timeout=WAIT) == 2


@pytest.mark.parametrize("lanes", [True, False])
def test_connect_lanes_warns_and_is_ignored(server: rpycsvc.Server, lanes: bool) -> None:
    with pytest.warns(DeprecationWarning, match="lanes") as caught:
        c = rpycsvc.connect(server.address, output="discard", lanes=lanes)
    try:
        (warning,) = [w for w in caught if issubclass(w.category, DeprecationWarning)]
        assert warning.filename == __file__  # it points at the caller's line
        runs_tasks(c)
    finally:
        c.close()


def test_connect_without_lanes_does_not_warn(server: rpycsvc.Server) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with rpycsvc.connect(server.address, output="discard") as c:
            runs_tasks(c)
    said = [str(w.message) for w in caught if "lanes" in str(w.message)]
    assert not said, said


def test_server_config_lanes_false_is_logged_and_ignored(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rpycsvc.server"), \
            running_server(workers=1, lanes=False) as srv, \
            rpycsvc.connect(srv.address, output="discard") as c:
        runs_tasks(c)
    said = [r.getMessage() for r in caplog.records
            if r.name == "rpycsvc.server" and r.levelno == logging.WARNING]
    assert any("--no-lanes" in m and "deprecated" in m for m in said), said


def test_server_config_default_logs_no_deprecation(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rpycsvc.server"), \
            running_server(workers=1) as srv, \
            rpycsvc.connect(srv.address, output="discard") as c:
        runs_tasks(c)
    said = [r.getMessage() for r in caplog.records if "lanes" in r.getMessage()]
    assert not said, said


def test_serve_no_lanes_still_starts_and_says_so(server_process: type[ServerProcess],
                                                 tmp_path: Path) -> None:
    """Existing command lines with --no-lanes still start a server that runs tasks, and its
    log says the option is ignored."""
    log = tmp_path / "server.log"
    srv = server_process("--workers", "1", "--no-lanes", "-v", "--logfile", str(log))
    with rpycsvc.connect(srv.address, output="discard") as c:
        runs_tasks(c)
    deadline = time.monotonic() + WAIT
    while "deprecated" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    line = next(x for x in log.read_text().splitlines() if "deprecated" in x)
    assert "WARNING" in line and "--no-lanes" in line, line
