"""Workload ``map_and_memory``: map and submit throughput, and client and server memory under it.

Tasks per second over ``map`` of no-ops and unbatched ``submit`` futures, against pipelined
raw RPyC calls and against the local limit: a ``concurrent.futures.ProcessPoolExecutor``
with as many processes as the cluster has workers (at most this machine's cores), mapping
the same no-ops at its best chunksize, its runs alternating with the cluster's; the time to
the first result; the client's RSS during the maps and whether the servers' RSS stays
bounded from one map to the next.
"""

from __future__ import annotations

import os
import time
import warnings

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
    pool = _LocalPool(min(bench.cluster.total_workers, os.cpu_count() or 1))
    try:
        for run in range(3):  # alternating with the local pool's runs: the same load on both
            runs.append(_one_map(bench, n, run))
            after.append(sum(s["rss_total_bytes"] for s in bench.server_stats()))
            pool.run(n, bench)
    finally:
        pool.close()
    rates = [x["rate"] for x in runs]
    rate = median(rates)
    ref = _rpyc_pipelined(bench)
    bench.report.details["map_runs"] = runs
    bench.report.details["map_local_pool"] = pool.rates
    bench.report.add(Figure("map_throughput", f"map of {n:,} no-ops (median of 3)", rate,
                            "tasks/s", "pipelined raw rpyc pings (1 server)", ref, rate / ref,
                            ">= 50,000/s", rate >= 50_000))
    best, pool_rate = pool.best()
    bench.report.add(Figure("map_vs_local_pool", f"map of {n:,} no-ops (median of 3)", rate,
                            "tasks/s",
                            f"local ProcessPoolExecutor({pool.workers}).map, {pool.context} "
                            f"start, best chunksize {best:,}", pool_rate, rate / pool_rate,
                            ">= 0.8x", rate >= 0.8 * pool_rate))
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


#: The local pool's chunksizes: its reference is the best of them.
POOL_CHUNKSIZES = (100, 500, 2000, 5000)


class _LocalPool:
    """The local limit for a map of no-ops: a ``ProcessPoolExecutor`` of ``workers``
    processes in the multiprocessing context a user gets by default here (``fork`` on Linux
    before Python 3.14, ``forkserver`` from 3.14, ``spawn`` on macOS and Windows), timed
    at each of :data:`POOL_CHUNKSIZES` per :meth:`run`."""

    def __init__(self, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = max(1, workers)
        self.context = multiprocessing.get_start_method()
        self.rates: dict[int, list[float]] = {c: [] for c in POOL_CHUNKSIZES}
        with warnings.catch_warnings():
            # (3.12 and 3.13 warn that fork() in a process with threads may deadlock: a
            # user's program gets the same default and the same warning; the bench is quiet)
            warnings.simplefilter("ignore", DeprecationWarning)
            self._pool = ProcessPoolExecutor(self.workers)
            list(self._pool.map(noop, range(self.workers * 100), chunksize=100))  # started

    def run(self, n: int, bench: BenchRun) -> None:
        """Map ``n`` no-ops once at each chunksize (results checked)."""
        for chunksize in POOL_CHUNKSIZES:
            t0 = time.perf_counter()
            total = sum(self._pool.map(noop, range(n), chunksize=chunksize))
            self.rates[chunksize].append(n / (time.perf_counter() - t0))
            bench.report.check("map.local_pool_results", total == n * (n - 1) // 2,
                               f"results summing to {total}")

    def best(self) -> tuple[int, float]:
        """The chunksize with the best median rate, and that rate."""
        medians: dict[int, float] = {c: median(r) for c, r in self.rates.items() if r}
        best = max(medians, key=medians.__getitem__)
        return best, medians[best]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


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

