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
    "map_throughput", "map_vs_local_pool", "map_client_cpu", "map_first_result",
    "submit_throughput", "map_client_rss",
    "server_rss_growth",
    "sleep_200x10ms", "sleep_200x10ms_submit",
    "cpu_speedup", "cpu_speedup_vs_pool",
    "stdout_stream", "stdout_capture",
    "server_rss_after_transfers",
    "numpy_up", "numpy_down", "bytes_up", "bytes_down",
}
#: Checks that must be present (a workload that never ran leaves its checks out).
CHECKS = {
    "memory.idle_stats", "latency.results", "latency.tcp_echo_count", "map.warmup",
    "map.run0.results", "map.run1.results", "map.run2.results", "map.local_pool_results",
    "submit.results", "map.rpyc_pipelined",
    "sleep.results", "sleep.submit_results", "cpu.cluster_results", "cpu.pool_results",
    "cpu.serial_results",
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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_workload_ran_once_in_order(report: dict) -> None:
    """The run times each workload of ``suite.WORKLOADS`` (a new workload module shows up
    here once it is listed there), in the order listed."""
    from rpycsvc.cli.bench.suite import WORKLOADS

    assert list(report["details"]["workload_s"]) == list(WORKLOADS)


def test_bench_help_loads_the_command_only() -> None:
    """``rpycsvc bench --help`` builds its parser from the package's ``__init__`` alone: no
    workload, section, reference or report module of the bench, and no cluster code."""
    from tests.test_lazy_import import imported_by_cli

    loaded = imported_by_cli("bench", "--help")
    assert "rpycsvc.cli.bench" in loaded
    assert not {m for m in loaded if m.startswith("rpycsvc.cli.bench.")}, sorted(loaded)
    assert "rpycsvc.client.cluster" not in loaded, sorted(loaded)


# -- the pieces, without servers ------------------------------------------------------------------

def test_a_failed_check_stays_failed() -> None:
    from rpycsvc.cli.bench.report import Report

    r = Report()
    r.check("sums", False, "got 3, want 4")
    r.check("sums", True)  # a later run that happened to be right does not hide the first
    assert r.checks == {"sums": False}
    assert r.errors == ["check failed: sums: got 3, want 4"]


def test_table_shows_pass_miss_and_failed_checks() -> None:
    from rpycsvc.cli.bench.report import Figure, Report, render

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

    from rpycsvc.cli.bench.raw_socket import _LEN, _raw_loop
    from rpycsvc.server.wire import _recv_exact

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

    from rpycsvc.cli.bench.raw_socket import RawPeer

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


# -- the transports section -----------------------------------------------------------------------

#: Rows of the transports section, by transport (TLS and SSH only where openssl / sshd exist).
TRANSPORT_ROWS = {
    "plain": {"transports_plain_p50", "transports_plain_futures", "transports_plain_up",
              "transports_plain_down"},
    "authkey": {"transports_authkey_p50", "transports_authkey_futures", "transports_authkey_up",
                "transports_authkey_down"},
    "tls": {"transports_tls_p50", "transports_tls_futures", "transports_tls_up",
            "transports_tls_down"},
    "ssh": {"transports_ssh_p50", "transports_ssh_futures", "transports_ssh_up",
            "transports_ssh_down"},
}


def _expected_transports() -> tuple[set[str], set[str]]:
    """(transports this machine can run, their expected row keys)."""
    import shutil

    from rpycsvc.cli.bench.sshd import unavailable

    kinds = {"plain", "authkey"}
    if shutil.which("openssl"):
        kinds.add("tls")
    if unavailable() is None:
        kinds.add("ssh")
    return kinds, set().union(*(TRANSPORT_ROWS[k] for k in kinds))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_transports_section_alone_prints_every_row() -> None:
    """``bench --transports --quick``: only the transports rows, each with its reference,
    ratio and PASS/MISS where it has a target; every result right; skips said in notes."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "rpycsvc.cli", "bench", "--transports", "--quick", "--json"],
        capture_output=True, text=True, timeout=280, cwd=str(REPO), env=env,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    doc = json.loads(proc.stdout)
    kinds, rows = _expected_transports()
    assert set(doc["figures"]) == rows
    assert set(doc["setup"]["transports"]) == kinds
    for key, fig in doc["figures"].items():
        assert "FAILED" not in fig["label"], (key, fig)
        assert math.isfinite(fig["value"]) and fig["value"] > 0, (key, fig)
        assert (fig["passed"] is None) == (not fig["target"]), (key, fig)
        if key != "transports_plain_futures":  # the one row without a reference
            assert fig["ref_value"] > 0 and fig["ratio"] > 0, (key, fig)
    for key in ("transports_plain_p50", "transports_plain_up", "transports_plain_down",
                *(f"transports_{k}_{x}" for k in kinds - {"plain", "authkey"}
                  for x in ("p50", "up", "down"))):
        assert doc["figures"][key]["passed"] in (True, False), key
    assert doc["ok"] is True and doc["errors"] == [], doc["errors"]
    assert doc["checks"] == {"transports.latency_results": True,
                             "transports.futures_results": True}
    for kind, name in (("tls", "TLS"), ("ssh", "SSH deployment")):
        if kind not in kinds:
            assert any(n.startswith(f"transports: {name} skipped") for n in doc["notes"])


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_transports_without_openssl_or_ssh_are_skipped_with_a_note(monkeypatch) -> None:
    """With neither ``openssl`` nor ``ssh`` on PATH, TLS and SSH are skipped and say why in
    the table; plain TCP and authkey are still measured."""
    from rpycsvc.cli.bench.report import Report, render
    from rpycsvc.cli.bench.transports import TransportSizes, run_section

    monkeypatch.setenv("PATH", str(REPO / "no-such-bin-dir"))
    report = Report(setup={"servers": "transports", "workers": 4, "threads": 512, "python": "3",
                           "rpyc": "6", "cores": 2, "quick": True, "load_start": "?"})
    sizes = TransportSizes(latency_samples=20, latency_runs=1, futures=20, futures_runs=1,
                           transfer_bytes=1 << 16, transfer_runs=1, step_timeout=60)
    run_section(report, sizes)
    assert {f.key for f in report.figures} == TRANSPORT_ROWS["plain"] | TRANSPORT_ROWS["authkey"]
    assert all(report.checks.values()), report.errors
    text = render(report)
    assert "note: transports: TLS skipped: the openssl command is not on PATH" in text
    assert "note: transports: SSH deployment skipped: ssh is not on PATH" in text
    assert "plain TCP: 64 KiB bytes sent" in text and "authkey: 64 KiB bytes received" in text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_step_past_its_deadline_is_a_failed_row_not_a_crash() -> None:
    """With a 20 ms deadline per step, at least every 64 MiB transfer misses it (and a
    transport whose step failed is dropped from the rest of the run). Each missing figure
    becomes a MISS row whose label says FAILED and why, the failures are reported as failed
    checks, nothing is raised, and every server the section started is stopped afterwards."""
    import socket
    import time

    from rpycsvc.cli.bench.report import Report, render
    from rpycsvc.cli.bench.transports import TransportSizes, run_section

    report = Report(setup={"servers": "transports", "workers": 8, "threads": 1024,
                           "python": "3", "rpyc": "6", "cores": 2, "quick": True,
                           "load_start": "?"})
    sizes = TransportSizes(latency_samples=20, latency_runs=1, futures=20, futures_runs=1,
                           transfer_bytes=64 << 20, transfer_runs=1, step_timeout=0.02)
    run_section(report, sizes)  # returns: nothing raised
    kinds, _ = _expected_transports()
    rows = {f.key: f for f in report.figures}
    for kind in kinds:
        for way in ("up", "down"):
            fig = rows[f"transports_{kind}_{way}"]
            assert "FAILED (" in fig.label and fig.passed is False, fig
    assert not all(report.checks.values())
    assert any("did not finish within 0.02 s" in e for e in report.errors), report.errors
    assert "FAILED" in render(report) and "MISS" in render(report)
    # every TCP server the section started is gone (bounded wait: they stop on stdin EOF)
    addresses = [a for k, a in report.setup["transports"].items() if k != "ssh"]
    assert addresses
    deadline = time.monotonic() + 30
    for address in addresses:
        host, port = address.rsplit(":", 1)
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
            except OSError:
                break
            assert time.monotonic() < deadline, f"{address} still accepts connections"
            time.sleep(0.05)


def test_transports_refuses_hosts_and_local() -> None:
    """The section starts servers of its own; HOSTs or --local with it are an error, not
    silently ignored."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "rpycsvc.cli", "bench", "--transports", "--local", "2"],
        capture_output=True, text=True, timeout=60, cwd=str(REPO), env=env,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "--transports starts servers of its own" in proc.stderr
