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
    "cpu_speedup",
    "stdout_stream", "stdout_capture",
    "server_rss_after_transfers",
    "numpy_up", "numpy_down", "bytes_up", "bytes_down",
}
#: Checks that must be present (a workload that never ran leaves its checks out).
CHECKS = {
    "memory.idle_stats", "latency.results", "latency.tcp_echo_count", "map.warmup",
    "map.run0.results", "map.run1.results", "submit.results", "map.rpyc_pipelined",
    "sleep.results", "cpu.results", "cpu.serial_results", "stdout.streamed_lines",
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
