"""``rpycsvc top``: :func:`render` is a pure function of two rounds of snapshots; the
:class:`Monitor` reads real servers (running tasks, recent failures, counters); ``--once``
prints one frame headless."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import rpycsvc
from rpycsvc.cli.top import Monitor, Snapshot, render, throughput
from tests.support.rendezvous import Gate, pass_gate
from tests.support.servers import REPO

WAIT = 30.0
NOW = 1_700_000_000.0


def stats(done: int, failed: int = 0, pid: int = 1, **kw: object) -> dict[str, object]:
    return {"pid": pid, "tasks_done": done, "tasks_failed": failed, "tasks_running": 1,
            "tasks_queued": 4, "workers": 2, "load_average": (0.5, 0.4, 0.3),
            "rss_total_bytes": 200 << 20, "uptime": 125.0, **kw}


def test_render_frame() -> None:
    a, b = "10.0.0.1:18812", "10.0.0.2:18812"
    previous = {a: Snapshot(a, NOW - 2, stats(100, 1))}
    snapshots = {
        a: Snapshot(a, NOW, stats(108, 2),
                    running=[{"task": "mymod:work", "client": "10.0.0.9:5000",
                              "mode": "process", "elapsed": 75.0}],
                    failures=[(NOW - 30, "mymod:work", "10.0.0.9:5000",
                               "ValueError: bad input\nmore detail")]),
        b: Snapshot(b, NOW, error="ConnectError: refused"),
    }
    frame = render(snapshots, previous, NOW)
    lines = frame.splitlines()
    assert "1/2 servers up" in lines[0] and "4.5 tasks/s" in lines[0]
    row_a = next(ln for ln in lines if ln.startswith(a))
    assert row_a.split() == [a, "4.5", "1", "4", "108", "2", "2", "0.50", "200M", "2m05s"]
    row_b = next(ln for ln in lines if ln.startswith(b))
    assert row_b.split()[1] == "DOWN" and row_b.endswith("ConnectError: refused")
    running = lines[lines.index("RUNNING NOW (1)") + 2]
    assert running.split() == [a, "mymod:work", "10.0.0.9:5000", "process", "1m15s"]
    failure = lines[lines.index("RECENT FAILURES") + 2]
    assert failure.split()[:4] == ["30s", "ago", a, "mymod:work"]
    assert failure.endswith("ValueError: bad input")  # first line of the error only


def test_render_first_frame_and_width() -> None:
    a = "127.0.0.1:1"
    snaps = {a: Snapshot(a, NOW, stats(5))}
    frame = render(snaps, {}, NOW)
    assert frame.splitlines()[0].endswith("- tasks/s")  # no earlier frame: no rate yet
    assert "RUNNING NOW (0)" in frame and "(none)" in frame
    narrow = render(snaps, {}, NOW, width=30).splitlines()
    assert max(len(ln) for ln in narrow) == 30
    assert narrow == [ln[:30] for ln in frame.splitlines()]


@pytest.mark.parametrize(("prev", "now", "expected"), [
    (None, Snapshot("a", NOW, stats(10)), None),                       # first frame
    (Snapshot("a", NOW - 1, stats(10)), Snapshot("a", NOW, stats(13, 1)), 4.0),
    (Snapshot("a", NOW - 1, stats(10)), Snapshot("a", NOW, stats(3, pid=2)), None),  # restart
    (Snapshot("a", NOW - 1, error="down"), Snapshot("a", NOW, stats(3)), None),
])
def test_throughput(prev: Snapshot | None, now: Snapshot, expected: float | None) -> None:
    assert throughput(now, prev) == expected


def test_monitor_sees_running_tasks_failures_and_throughput(
        server: rpycsvc.Server, client: rpycsvc.Client) -> None:
    monitor = Monitor([server.address, "127.0.0.1:1"], timeout=5)
    try:
        first = monitor.poll()
        assert first["127.0.0.1:1"].error and "ConnectError" in first["127.0.0.1:1"].error
        with pytest.raises(ZeroDivisionError):
            client.compute(divmod, 1, 0)
        assert [client.compute(abs, -i) for i in range(3)] == [0, 1, 2]
        with Gate() as gate:
            held = client.submit(pass_gate, gate.port, "held")
            _, conn = gate.arrival()  # the task is running now
            second = monitor.poll()
            gate.release(conn)
            assert held.result(timeout=WAIT) == "held"
        # The failure list may be a moment behind the task counts (a worker reports a task
        # that ran straight from its client when it flushes its notes): wait for it.
        deadline = time.monotonic() + WAIT
        later = second
        while not later[server.address].failures and time.monotonic() < deadline:
            later = monitor.poll()
    finally:
        monitor.close()
    snap = second[server.address]
    assert snap.error is None
    assert [r["task"] for r in snap.running] == ["pass_gate"]
    assert snap.running[0]["client"].startswith("127.0.0.1:")
    failures = later[server.address].failures
    assert failures and failures[-1][1] == "divmod"
    rate = throughput(snap, first[server.address])
    assert rate == pytest.approx(4 / (snap.taken - first[server.address].taken))
    frame = render(second, first, snap.taken)
    assert "pass_gate" in frame and "DOWN" in frame
    assert "divmod" in render(later, first, later[server.address].taken)


def test_once_prints_one_frame(server: rpycsvc.Server, client: rpycsvc.Client) -> None:
    with Gate() as gate:
        held = client.submit(pass_gate, gate.port, "held")
        _, conn = gate.arrival()
        try:
            out = subprocess.run(
                [sys.executable, "-m", "rpycsvc.cli", "top", "--once", "--interval", "0.2",
                 server.address], capture_output=True, text=True, timeout=WAIT, cwd=str(REPO),
                stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))
        finally:
            gate.release(conn)
        assert held.result(timeout=WAIT) == "held"
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout  # no screen clearing when not on a terminal
    assert out.stdout.startswith("rpycsvc top")
    assert out.stdout.count("rpycsvc top") == 1
    assert "RUNNING NOW (1)" in out.stdout and "pass_gate" in out.stdout
