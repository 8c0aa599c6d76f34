"""Workload ``sleeps``: 200 x sleep(10 ms) in thread mode over the servers, against a local pool.

Two rows: a ``map`` of the 200 sleeps, and 200 unbatched ``submit`` futures (issue 15's item
5: within 1.5x a local 200-thread pool doing the same, measured in the same run, interleaved).
"""

from __future__ import annotations

import time
from concurrent.futures import wait

from rpycsvc.cli.bench.measuring import median
from rpycsvc.cli.bench.report import Figure
from rpycsvc.cli.bench.workload import BenchRun

SLEEPS = 200
SECONDS = 0.01


def measure(bench: BenchRun) -> None:
    from concurrent.futures import ThreadPoolExecutor

    args = [SECONDS] * SLEEPS
    opts = bench.cluster.options(mode="thread")

    def remote_map() -> float:
        t0 = time.perf_counter()
        out = list(opts.map(time.sleep, args, timeout=60))
        dt = time.perf_counter() - t0
        bench.report.check("sleep.results", out == [None] * len(args), f"{len(out)} results")
        return dt

    def remote_submit() -> float:
        t0 = time.perf_counter()
        futures = [opts.submit(time.sleep, s) for s in args]
        out = [f.result(timeout=60) for f in futures]
        dt = time.perf_counter() - t0
        bench.report.check("sleep.submit_results", out == [None] * len(args),
                           f"{len(out)} results")
        return dt

    with ThreadPoolExecutor(len(args)) as pool:
        def local_map() -> float:
            t0 = time.perf_counter()
            out = list(pool.map(time.sleep, args, timeout=60))
            dt = time.perf_counter() - t0
            bench.report.check("sleep.local_results", len(out) == len(args))
            return dt

        def local_submit() -> float:
            t0 = time.perf_counter()
            futures = [pool.submit(time.sleep, s) for s in args]
            done, pending = wait(futures, timeout=60)
            dt = time.perf_counter() - t0
            bench.report.check("sleep.local_submit_results", not pending and all(
                f.exception() is None for f in done))
            return dt

        plan = {"remote": remote_map, "local": local_map,
                "remote_submit": remote_submit, "local_submit": local_submit}
        for fn in plan.values():  # warm-ups (the pool's threads exist from now on)
            fn()
        times: dict[str, list[float]] = {k: [] for k in plan}
        for _ in range(bench.sizes.sleep_runs):
            for name, fn in plan.items():  # interleaved with the local references
                times[name].append(fn())
    ms = {k: median(v) * 1e3 for k, v in times.items()}
    bench.report.details["sleep_ms"] = {k: [x * 1e3 for x in v] for k, v in times.items()}
    bench.report.add(Figure("sleep_200x10ms", f"{SLEEPS} x sleep(10 ms), thread mode, map",
                            ms["remote"], "ms", "local 200-thread pool", ms["local"],
                            ms["remote"] / ms["local"], "<= 40 ms", ms["remote"] <= 40))
    ratio = ms["remote_submit"] / ms["local_submit"]
    bench.report.add(Figure("sleep_200x10ms_submit",
                            f"{SLEEPS} unbatched submit(sleep, 10 ms), thread mode",
                            ms["remote_submit"], "ms", "local 200-thread pool, submit",
                            ms["local_submit"], ratio, "<= 1.5x", ratio <= 1.5))
