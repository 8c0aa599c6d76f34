"""Workload ``sleeps``: 200 x sleep(10 ms) in thread mode over the servers, against a local pool."""

from __future__ import annotations

import time

from rpycsvc.cli.bench.measuring import median
from rpycsvc.cli.bench.report import Figure
from rpycsvc.cli.bench.workload import BenchRun


def measure(bench: BenchRun) -> None:
    from concurrent.futures import ThreadPoolExecutor

    args = [0.01] * 200
    opts = bench.cluster.options(mode="thread")

    def remote() -> float:
        t0 = time.perf_counter()
        out = list(opts.map(time.sleep, args, timeout=60))
        dt = time.perf_counter() - t0
        bench.report.check("sleep.results", out == [None] * len(args), f"{len(out)} results")
        return dt

    with ThreadPoolExecutor(len(args)) as pool:
        def local() -> float:
            t0 = time.perf_counter()
            out = list(pool.map(time.sleep, args, timeout=60))
            dt = time.perf_counter() - t0
            bench.report.check("sleep.local_results", len(out) == len(args))
            return dt

        remote()
        local()  # warm-ups (the pool's threads exist from now on)
        rt, lt = [], []
        for _ in range(bench.sizes.sleep_runs):
            rt.append(remote())
            lt.append(local())
    ms, ref = median(rt) * 1e3, median(lt) * 1e3
    bench.report.details["sleep_ms"] = {"remote": [x * 1e3 for x in rt],
                                        "local": [x * 1e3 for x in lt]}
    bench.report.add(Figure("sleep_200x10ms", "200 x sleep(10 ms), thread mode", ms, "ms",
                            "local 200-thread pool", ref, ms / ref, "<= 40 ms", ms <= 40))

