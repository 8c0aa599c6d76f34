"""Workload ``map_and_memory``: map and submit throughput, and client and server memory under it.

Tasks per second over ``map`` of no-ops and unbatched ``submit`` futures, against pipelined
raw RPyC calls; the time to the first result; the client's RSS during the maps and whether
the servers' RSS stays bounded from one map to the next.
"""

from __future__ import annotations

import time

from rpycsvc.cli.bench.measuring import MB, median, rss_self
from rpycsvc.cli.bench.report import Figure
from rpycsvc.cli.bench.tasks import noop
from rpycsvc.cli.bench.workload import BenchRun


def measure(bench: BenchRun) -> None:
    n = bench.sizes.map_tasks
    cl = bench.cluster
    warm = list(cl.map(noop, range(min(n, 2000)), timeout=60))
    bench.report.check("map.warmup", warm == list(range(min(n, 2000))))
    runs = []
    after = []
    for run in range(2):
        runs.append(_one_map(bench, n, run))
        after.append(sum(s["rss_total_bytes"] for s in bench.server_stats()))
    rates = [x["rate"] for x in runs]
    rate = median(rates)
    ref = _rpyc_pipelined(bench)
    bench.report.details["map_runs"] = runs
    bench.report.add(Figure("map_throughput", f"map of {n:,} no-ops (median of 2)", rate,
                            "tasks/s", "pipelined raw rpyc pings (1 server)", ref, rate / ref,
                            ">= 50,000/s", rate >= 50_000))
    servers = len(bench.cluster.clients)
    bench.report.add(Figure("map_client_cpu", f"map: client CPU per item, {servers} servers",
                            median([x["client_cpu_us"] for x in runs]), "us",
                            "", None,
                            None))
    first = median([x["first_s"] for x in runs]) * 1e3
    bench.report.add(Figure("map_first_result", "map: time to first result", first, "ms",
                            "compute(noop) p50", bench.compute_p50 / 1e3,
                            first / (bench.compute_p50 / 1e3) if bench.compute_p50 else None))
    m = max(100, n // 20)
    sub = _submit_rate(bench, m)
    bench.report.add(Figure("submit_throughput", f"{m:,} submit(noop) futures, no batching", sub,
                            "tasks/s", "pipelined raw rpyc pings (1 server)", ref, sub / ref))
    peak = max(x["rss_peak"] for x in runs)
    before = runs[0]["rss_before"]
    bench.report.add(Figure("map_client_rss", "client RSS peak during the maps", peak / MB, "MB",
                            "client RSS before", before / MB, peak / before))
    bench.report.add(Figure("server_rss_growth",
                            f"server trees' RSS after {2 * n:,} map tasks", after[1] / MB, "MB",
                            f"after {n:,}", after[0] / MB, after[1] / after[0],
                            "<= 1.05x (bounded)", after[1] <= 1.05 * after[0]))


def _one_map(bench: BenchRun, n: int, run: int) -> dict[str, float]:
    rss_before = peak = rss_self()
    total = count = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    it = bench.cluster.map(noop, range(n), timeout=120)
    first = next(it)
    t_first = time.perf_counter() - t0
    total, count = first, 1
    for x in it:
        total += x
        count += 1
        if not count & 4095:
            peak = max(peak, rss_self())
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    peak = max(peak, rss_self())
    bench.report.check(f"map.run{run}.results", count == n and total == n * (n - 1) // 2,
                       f"{count} results summing to {total}")
    return {"seconds": dt, "rate": n / dt, "first_s": t_first, "rss_before": rss_before,
            "rss_peak": peak, "client_cpu_us": cpu / n * 1e6}


def _submit_rate(bench: BenchRun, n: int) -> float:
    from concurrent.futures import wait

    for warm in (True, False):
        k = min(n, 500) if warm else n
        t0 = time.perf_counter()
        futs = [bench.cluster.submit(noop, i) for i in range(k)]
        done, _ = wait(futs, timeout=120)
        dt = time.perf_counter() - t0
        ok = len(done) == k and [f.result(0) for f in futs] == list(range(k))
        bench.report.check("submit.results", ok, f"{len(done)} of {k} futures done")
    return n / dt


def _rpyc_pipelined(bench: BenchRun) -> float:
    import rpyc

    n = bench.sizes.rpyc_pipelined
    aping = rpyc.async_(bench.client.conn.root.ping)
    for warm in (True, False):
        t0 = time.perf_counter()
        res = [aping(i) for i in range(n)]
        for r in res:
            r.set_expiry(60)
        got = [r.value for r in res]
        dt = time.perf_counter() - t0
        if not warm:
            bench.report.check("map.rpyc_pipelined", got == list(range(n)))
    return n / dt

