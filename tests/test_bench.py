"""``rpycsvc bench --local 2 --quick --json`` as a subprocess: every figure is there and
positive, and every correctness check of every workload passed. Speed is not asserted here:
the benchmark itself says PASS or MISS against the targets; tests only check it is honest."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Every figure the table prints, by its JSON key.
FIGURES = {
    "server_idle_rss", "server_idle_tree_rss",
    "compute_p50_vs_rpyc", "compute_p50_vs_tcp", "compute_p99",
    "map_throughput", "map_first_result", "submit_throughput", "map_client_rss",
    "server_rss_growth",
    "sleep_200x10ms",
    "cpu_speedup", "cpu_speedup_vs_pool",
    "stdout_stream", "stdout_capture",
    "server_rss_after_transfers",
    "numpy_up", "numpy_down", "bytes_up", "bytes_down",
}
#: Checks that must be present (a workload that never ran leaves its checks out).
CHECKS = {
    "memory.idle_stats", "latency.results", "latency.tcp_echo_count", "map.warmup",
    "map.run0.results", "map.run1.results", "submit.results", "map.rpyc_pipelined",
    "sleep.results", "cpu.cluster_results", "cpu.pool_results", "cpu.serial_results",
    "stdout.streamed_lines",
    "stdout.discard_result", "stdout.captured_lines", "transfer.numpy_up",
    "transfer.bytes_up", "transfer.numpy_down", "transfer.bytes_down", "transfer.raw_counts",
}


@pytest.fixture(scope="module")
def report() -> dict:
    pytest.importorskip("numpy")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "rpycsvc.cli", "bench", "--local", "2", "--quick", "--json"],
        capture_output=True, text=True, timeout=240, cwd=str(REPO), env=env,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    doc: dict = json.loads(proc.stdout)
    return doc


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_figure_is_present_and_positive(report: dict) -> None:
    figures = report["figures"]
    assert set(figures) == FIGURES
    for key, fig in figures.items():
        assert math.isfinite(fig["value"]) and fig["value"] > 0, (key, fig)
        if fig["ref_value"] is not None:
            assert math.isfinite(fig["ref_value"]) and fig["ref_value"] > 0, (key, fig)
        if fig["ratio"] is not None:
            assert fig["ratio"] > 0, (key, fig)
        # a figure with a target says PASS or MISS; one without says neither
        assert (fig["passed"] is None) == (not fig["target"]), (key, fig)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_result_was_checked_and_right(report: dict) -> None:
    assert report["ok"] is True, report["errors"]
    assert report["errors"] == []
    checks = report["checks"]
    assert not CHECKS - set(checks), CHECKS - set(checks)
    assert all(checks.values()), {k: v for k, v in checks.items() if not v}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_setup_names_the_references(report: dict) -> None:
    setup = report["setup"]
    assert len(setup["addresses"]) == 2
    assert all(a.startswith("127.0.0.1:") for a in setup["addresses"])
    assert "thread-mode task" in setup["raw_tcp_reference"]
    assert setup["quick"] is True
    assert setup["workers"] >= 2


# -- the pieces, without servers ------------------------------------------------------------------

def test_a_failed_check_stays_failed() -> None:
    from rpycsvc.bench import Report

    r = Report()
    r.check("sums", False, "got 3, want 4")
    r.check("sums", True)  # a later run that happened to be right does not hide the first
    assert r.checks == {"sums": False}
    assert r.errors == ["check failed: sums: got 3, want 4"]


def test_table_shows_pass_miss_and_failed_checks() -> None:
    from rpycsvc.bench import Figure, Report, render

    r = Report(setup={"servers": "1 server (127.0.0.1:1)", "workers": 2, "threads": 8,
                      "python": "3", "rpyc": "6.0.2", "cores": 2, "quick": True,
                      "load_start": "0.1"})
    r.add(Figure("a", "fast thing", 120.0, "us", "reference", 100.0, 1.2, "<= 1.3x", True))
    r.add(Figure("b", "slow thing", 50.0, "MB/s", "raw", 500.0, 0.1, ">= 0.6x", False))
    r.add(Figure("c", "info", 3.0, "ms"))
    r.check("b.bytes", False, "CRC-32 mismatch")
    text = render(r)
    assert "PASS" in text and "MISS" in text
    assert "FAILED: b.bytes" in text and "CRC-32 mismatch" in text
    assert "1 PASS, 1 MISS (b)" in text


def test_raw_reference_protocol_round_trips() -> None:
    import socket
    import struct
    import threading
    import zlib

    from rpycsvc.bench import _LEN, _raw_loop, _recv_exact

    here, there = socket.socketpair()
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(_raw_loop(there)), daemon=True)
    t.start()
    try:
        here.settimeout(10)
        here.sendall(b"P")
        assert here.recv(1) == b"P"
        data = bytes(range(256)) * 1000
        here.sendall(b"U" + _LEN.pack(len(data)) + data)
        assert _recv_exact(here, 1) == b"A"
        here.sendall(b"C")
        assert _LEN.unpack(_recv_exact(here, 8))[0] == zlib.crc32(data)
        here.sendall(b"G" + struct.pack("!QQ", 5000, 7))
        crc = _LEN.unpack(_recv_exact(here, 8))[0]
        here.sendall(b"D")
        assert zlib.crc32(_recv_exact(here, 5000)) == crc
        here.sendall(b"Q")
        t.join(10)
    finally:
        here.close()
        there.close()
    assert out == {"pings": 1, "bytes_in": len(data), "bytes_out": 5000}


def test_raw_reference_falls_back_to_a_local_subprocess() -> None:
    """A server without thread mode can't host the raw reference: a subprocess serves it."""
    import zlib

    from rpycsvc.bench import RawPeer

    class NoThreads:
        address = "127.0.0.1:1"
        threads = 0

    peer = RawPeer(NoThreads(), timeout=30)
    assert "subprocess on 127.0.0.1" in peer.where
    assert peer.ping() > 0
    data = b"x" * 100_000
    assert peer.upload(data, zlib.crc32(data)) > 0
    assert peer.download(50_000, 3) > 0
    assert peer.close() == {"pings": 1, "bytes_in": 100_000, "bytes_out": 50_000}
