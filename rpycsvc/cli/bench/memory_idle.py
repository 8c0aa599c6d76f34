"""Workload ``memory_idle``: the servers' RSS at rest, against a bare Python that imported rpyc."""

from __future__ import annotations

import time

from rpycsvc.cli.bench.measuring import MB, bare_python_rss
from rpycsvc.cli.bench.report import Figure
from rpycsvc.cli.bench.workload import BenchRun


def measure(bench: BenchRun) -> None:
    time.sleep(0.5)  # let freshly started workers settle
    stats = bench.server_stats()
    rss = max(s["rss_bytes"] for s in stats)
    tree = max(s["rss_total_bytes"] for s in stats)
    bench.idle_tree = tree
    bare = bare_python_rss()
    bench.report.details["idle_stats"] = [
        {k: s[k] for k in ("address", "rss_bytes", "rss_total_bytes", "worker_pids",
                           "thread_worker_pid") if k in s} for s in stats]
    bench.report.check("memory.idle_stats", rss > 0 and tree >= rss, f"rss={rss} tree={tree}")
    bench.report.add(Figure("server_idle_rss", "server RSS idle (largest server process)",
                            rss / MB, "MB", "bare python + import rpyc", bare / MB,
                            rss / bare, "<= 60 MB", rss <= 60 * MB))
    procs = max(1 + len(s.get("worker_pids") or ()) + bool(s.get("thread_worker_pid"))
                for s in stats)
    bench.report.add(Figure("server_idle_tree_rss",
                            f"server tree RSS idle (server + workers, {procs} processes)",
                            tree / MB, "MB", f"{procs} x bare python", procs * bare / MB,
                            tree / (procs * bare)))
