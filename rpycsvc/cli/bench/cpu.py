"""Workload ``cpu``: the speedup of pure-Python CPU tasks over every worker, against a serial run.

Also against a local process pool of the same size (when the servers are local): what this
machine can give right now, with how much of a core the tasks got and where the rest went.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from rpycsvc.cli.bench.measuring import CpuMeter, median, timed
from rpycsvc.cli.bench.report import Figure
from rpycsvc.cli.bench.tasks import spin, spin_timed
from rpycsvc.cli.bench.workload import BenchRun


def measure(bench: BenchRun) -> None:
    s = bench.sizes
    spin(10_000)
    probe = 200_000
    t = min(timed(spin, probe) for _ in range(3))
    n = max(1000, int(probe * s.cpu_seconds / t))
    args = [n + k for k in range(s.cpu_tasks)]
    want = [spin(a) for a in args]  # also the warm-up of the serial run
    workers = bench.cluster.total_workers
    runs: dict[str, list[dict[str, float]]] = {"cluster": [], "pool": []}

    def parallel(kind: str, mapper: Callable[..., Any]) -> float:
        t0 = time.perf_counter()
        out = list(mapper(spin_timed, args, timeout=120))
        dt = time.perf_counter() - t0
        bench.report.check(f"cpu.{kind}_results", [x[0] for x in out] == want)
        busy: dict[int, float] = {}
        for _, wall, _, pid in out:
            busy[pid] = busy.get(pid, 0.0) + wall
        runs[kind].append({"wall": dt, "busiest": max(busy.values()), "processes": len(busy),
                           "core_share": sum(x[2] for x in out) / sum(x[1] for x in out)})
        return dt

    serial_share: list[float] = []

    def serial() -> float:
        t0, c0 = time.perf_counter(), time.thread_time()
        got = [spin(a) for a in args]
        dt = time.perf_counter() - t0
        serial_share.append((time.thread_time() - c0) / dt)
        bench.report.check("cpu.serial_results", got == want)
        return dt

    # The same tasks on a local process pool of the same size, interleaved: what this
    # machine can give right now (other load on a shared box shows up here too).
    pool = None
    if bench.local:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        plan: dict[str, Callable[[], float]] = {
            "serial": serial, "cluster": lambda: parallel("cluster", bench.cluster.map)}
        if pool is not None:
            plan["pool"] = lambda: parallel("pool", pool.map)
        for kind in ("cluster", "pool"):  # warm-ups
            if kind in plan:
                plan[kind]()
                runs[kind].clear()
        secs: dict[str, list[float]] = {k: [] for k in plan}
        meter = CpuMeter.of(bench.client)
        spent: dict[str, float] = {}
        for _ in range(s.cpu_runs):
            for kind, fn in plan.items():
                before = meter.read() if meter and kind == "cluster" else {}
                secs[kind].append(fn())
                if before:
                    meter.add(spent, before)  # type: ignore[union-attr]
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    med = {k: median(v) for k, v in secs.items()}
    speedup = med["serial"] / med["cluster"]
    ideal = min(workers, os.cpu_count() or 1) if bench.local else workers
    ideal = min(ideal, s.cpu_tasks)
    bench.report.details["cpu"] = {"n": n, "task_ms": med["serial"] / len(args) * 1e3,
                                   "seconds": secs, "runs": runs, "workers": workers,
                                   "serial_core_share": serial_share}
    for kind, what in (("cluster", "rpycsvc workers"), ("pool", "local pool")):
        if runs[kind]:
            share = median([r["core_share"] for r in runs[kind]])
            beyond = median([r["wall"] - r["busiest"] for r in runs[kind]])
            bench.report.notes.append(
                f"cpu, {what}: tasks got {share:.0%} of a core while running; a run took "
                f"{beyond * 1e3:.0f} ms beyond its busiest process's task time")
    if spent:
        bench.report.notes.append(
            f"cpu: CPU outside the tasks per rpycsvc run: this client "
            f"{spent['client'] / s.cpu_runs * 1e3:.0f} ms, server process of "
            f"{bench.client.address} {spent['server'] / s.cpu_runs * 1e3:.0f} ms "
            f"(serial run here got {median(serial_share):.0%} of a core)")
    label = f"{len(args)} CPU tasks of ~{s.cpu_seconds * 1e3:.0f} ms"
    bench.report.add(Figure("cpu_speedup", f"{label}: speedup (parallel {med['cluster']:.2f} s)",
                            speedup, "x", "serial here", med["serial"], None,
                            f">= {0.95 * ideal:.2f}x ({ideal} workers)", speedup >= 0.95 * ideal,
                            ref_unit="s"))
    if "pool" in med:
        pool_speedup = med["serial"] / med["pool"]
        bench.report.add(Figure("cpu_speedup_vs_pool", "CPU speedup vs what a local pool got",
                                speedup, "x", f"ProcessPoolExecutor({workers})", pool_speedup,
                                speedup / pool_speedup))

