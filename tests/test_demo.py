"""The quick start's first command: ``rpycsvc demo`` fans work out over local servers."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.servers import REPO


def test_demo_runs_a_fan_out_and_prints_results() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rpycsvc.cli", "demo", "--tasks", "4"],
        capture_output=True, text=True, timeout=180, cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("started 2 local servers")
    assert sum("conn.root.compute -> hello-" in ln for ln in lines) == 2
    assert sum(ln.startswith("  below ") for ln in lines) == 4
    assert "3**k: [1, 3, 9, 27, 81]" in lines
    assert any(ln.startswith("[127.0.0.1:") and "task hello-0 running" in ln for ln in lines)
    assert "'the': 3" in out.stdout
