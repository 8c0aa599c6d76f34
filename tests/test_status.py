"""``rpycsvc status``: live servers answer with their stats and round-trip time, a dead one
is shown DOWN with the reason and makes the exit status 1; the table is pure formatting."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import rpycsvc
from rpycsvc.cli.status import (
    ServerStatus,
    format_table,
    human_bytes,
    human_duration,
    probe,
    probe_all,
)
from tests.support.servers import REPO, ServerProcess

WAIT = 30.0


def status_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rpycsvc.cli", "status", *args],
                          capture_output=True, text=True, timeout=WAIT, cwd=str(REPO),
                          stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.fixture
def dead_address(server_process: type[ServerProcess]) -> str:
    """The address of a server that was running and has been killed: nothing listens."""
    proc = server_process("--workers", "1")
    proc.kill()
    return proc.address


def test_live_and_dead_servers(server: rpycsvc.Server, server_process: type[ServerProcess],
                               dead_address: str) -> None:
    live = server_process("--workers", "1")
    out = status_cli(server.address, live.address, dead_address, "--timeout", "5")
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["ADDRESS", "STATE", "RPYCSVC/RPYC/PY"]
    rows = {ln.split()[0]: ln for ln in lines[1:] if ln and ln.split()[0].count(":") == 1}
    assert rows[server.address].split()[1] == "up"
    assert rows[live.address].split()[1] == "up"
    assert rows[dead_address].split()[1] == "DOWN"
    assert "Connection refused" in rows[dead_address]
    assert f"rpycsvc {rpycsvc.__version__}" not in out.stdout  # versions are compact...
    assert f"{rpycsvc.__version__}/" in rows[live.address]      # ...but there
    assert "2 of 3 servers up, 1 DOWN" in out.stdout


def test_all_up_exits_zero_and_json_has_stats(server: rpycsvc.Server) -> None:
    out = status_cli(server.address, "--json")
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["ok"] and row["error"] is None
    assert row["address"] == server.address
    assert row["stats"]["pid"] == os.getpid()  # the in-process server
    assert row["stats"]["workers"] == server.config.effective_workers
    assert row["rtt_ms"] > 0


def test_probe_counts_tasks(server: rpycsvc.Server, client: rpycsvc.Client) -> None:
    before = probe(server.address).stats
    assert client.compute(abs, -5) == 5
    with pytest.raises(ZeroDivisionError):
        client.compute(divmod, 1, 0)
    after = probe(server.address)
    assert after.ok and after.rtt is not None and after.rtt > 0
    assert after.stats["tasks_done"] == before["tasks_done"] + 1
    assert after.stats["tasks_failed"] == before["tasks_failed"] + 1
    assert after.stats["cores"] >= 1 and after.stats["rss_total_bytes"] > 0


def test_probe_all_keeps_order_and_reports_each(server: rpycsvc.Server) -> None:
    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        dead_address = f"127.0.0.1:{s.getsockname()[1]}"
    results = probe_all([dead_address, server.address], timeout=5)
    assert [r.ok for r in results] == [False, True]
    assert results[0].address == dead_address
    assert "ConnectError" in (results[0].error or "")


def test_no_servers_is_a_usage_error() -> None:
    out = status_cli()
    assert out.returncode == 2
    assert "no servers" in out.stderr


def test_format_table_is_pure() -> None:
    up = ServerStatus("10.0.0.1:18812", rtt=0.00042, stats={
        "rpycsvc_version": "1.2", "rpyc_version": "6.0.2", "python_version": "3.11.7",
        "cores": 8, "workers": 8, "tasks_running": 3, "tasks_queued": 12, "tasks_done": 1000,
        "tasks_failed": 2, "load_average": (3.5, 2.0, 1.0), "rss_total_bytes": 3 << 30,
        "uptime": 90061.0})
    down = ServerStatus("10.0.0.2:18812", error="ConnectError: refused")
    text = format_table([up, down])
    header, row_up, row_down = text.splitlines()[:3]
    assert row_up.split() == ["10.0.0.1:18812", "up", "1.2/6.0.2/3.11.7", "8", "8", "3", "12",
                              "1000", "2", "3.50", "3.0G", "25h01m", "0.42ms"]
    assert row_down.split()[:2] == ["10.0.0.2:18812", "DOWN"]
    assert row_down.endswith("ConnectError: refused")
    # numeric columns are right-aligned under their headers
    assert row_up.index("1000") + 4 == header.index("DONE") + len("DONE")
    assert text.rstrip().endswith("1 of 2 servers up, 1 DOWN")


@pytest.mark.parametrize(("n", "text"), [(0, "0B"), (1023, "1023B"), (1536, "1.5K"),
                                         (10 << 20, "10M"), (None, "-")])
def test_human_bytes(n: int | None, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(("s", "text"), [(0.25, "0.2s"), (42, "42s"), (61, "1m01s"),
                                         (3725, "1h02m"), (3 * 86400 + 7200, "3d02h")])
def test_human_duration(s: float, text: str) -> None:
    assert human_duration(s) == text
