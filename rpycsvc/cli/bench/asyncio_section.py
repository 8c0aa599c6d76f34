"""``rpycsvc bench --asyncio``: the asyncio API against the sync API, in the same run.

Three figures, on the same servers and the same connections (an :class:`AsyncCluster`
over the bench's :class:`Cluster`), sync and async rounds interleaved so that drift in
the machine's load hits both:

- awaited ``submit`` throughput: ``submits`` no-op tasks awaited by ``concurrency``
  coroutines (each ``await cluster.submit(noop, i)`` in turn), against the sync API's
  ``submit`` of as many futures and a wait for all; target: at most 1.2x slower;
- ``await cluster.submit(noop, i)`` p50, one at a time, against
  ``cluster.submit(noop, i).result()``; target: at most 1.2x slower;
- the event loop's lag during those awaited submits: a coroutine asks to sleep 1 ms again
  and again; each wake-up's delay past that is a lag sample (p99, max; target max
  <= 20 ms). How late the loop runs what is ready, i.e. how long it was blocked.

Every result is checked (each task echoes its argument). :func:`run_section` is what a
full bench calls; :func:`run_asyncio` is the ``--asyncio`` command.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from concurrent.futures import wait
from dataclasses import asdict, dataclass
from typing import Any

from rpycsvc.cli.bench.measuring import median, pct
from rpycsvc.cli.bench.report import BenchError, Figure, Report, finish, load_average, say
from rpycsvc.cli.bench.tasks import noop

#: What the lag coroutine asks to sleep each time (seconds).
TICK = 0.001


@dataclass
class AsyncSizes:
    submits: int = 10_000
    concurrency: int = 64
    latency_samples: int = 2000
    rounds: int = 3

    @classmethod
    def quick(cls) -> AsyncSizes:
        return cls(submits=2000, concurrency=64, latency_samples=300, rounds=2)


class _Lag:
    """Samples the event loop's lag while running (see the module's docstring).

    Each sample also notes the CPU time the loop's thread itself used in it: a lag that is
    mostly that CPU is the loop busy with our code; the rest is the thread waiting for a
    core (a loaded machine) or for the GIL (the connections' reader threads)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (lag, loop thread CPU in it)
        self.gc_pauses: list[float] = []  # seconds of each garbage collection meanwhile
        self._gc_start = 0.0
        self._task: asyncio.Task[None] | None = None

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_pauses.append(time.perf_counter() - self._gc_start)

    async def _tick(self) -> None:
        clock, cpu = time.perf_counter, time.thread_time
        while True:
            t0, c0 = clock(), cpu()
            await asyncio.sleep(TICK)
            self.samples.append((max(0.0, clock() - t0 - TICK), cpu() - c0))

    def __enter__(self) -> _Lag:
        self._task = asyncio.ensure_future(self._tick())
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._on_gc)
        if self._task is not None:
            self._task.cancel()


class AsyncBench:
    def __init__(self, cluster: Any, sizes: AsyncSizes, report: Report) -> None:
        self.cluster = cluster
        self.sizes = sizes
        self.r = report

    async def run(self) -> None:
        from rpycsvc.client.aio import AsyncCluster

        ac = await AsyncCluster.from_cluster(self.cluster).start()
        try:
            # (a deadline for the whole section: a lost result must not hang the bench)
            await asyncio.wait_for(self._measure(ac), 600 + self.sizes.submits * 0.1)
        finally:
            await ac.close()

    async def _measure(self, ac: Any) -> None:
        s = self.sizes
        n = s.submits
        await self._awaited(ac, min(n, 500))  # warm-up, both ways
        self._sync_rate(min(n, 500))
        sync_rates: list[float] = []
        async_rates: list[float] = []
        lag: list[tuple[float, float]] = []
        gc_pauses: list[float] = []
        # this process's CPU per task (all its threads): what a machine shared with other
        # load still says when the rates swing with that load
        cpu: dict[str, list[float]] = {"sync": [], "async": []}
        for rnd in range(s.rounds):
            for kind in (("sync", "async") if rnd % 2 == 0 else ("async", "sync")):
                c0 = time.process_time()
                if kind == "sync":
                    sync_rates.append(self._sync_rate(n))
                else:
                    with _Lag() as meter:
                        async_rates.append(await self._awaited(ac, n))
                    lag.extend(meter.samples)
                    gc_pauses.extend(meter.gc_pauses)
                cpu[kind].append((time.process_time() - c0) / n * 1e6)
        if not lag:
            raise BenchError("the lag coroutine never ran during the awaited submits")
        sync_p50, async_p50 = await self._latency(ac)
        rate, ref = median(async_rates), median(sync_rates)
        self.r.details["asyncio"] = {
            "sizes": asdict(s), "sync_rates": sync_rates, "async_rates": async_rates,
            "lag_samples": len(lag), "sync_p50_us": sync_p50, "async_p50_us": async_p50,
            "client_cpu_us_per_task": {k: median(v) for k, v in cpu.items()}}
        self.r.add(Figure(
            "asyncio_submit_throughput",
            f"{n:,} awaited submit(noop), {s.concurrency} coroutines (median of {s.rounds})",
            rate, "tasks/s", f"sync submit() of {n:,} futures", ref, rate / ref,
            ">= 0.83x (<= 1.2x slower)", rate * 1.2 >= ref))
        self.r.add(Figure(
            "asyncio_submit_p50", "await submit(noop) p50", async_p50, "us",
            "submit(noop).result() p50", sync_p50, async_p50 / sync_p50, "<= 1.2x",
            async_p50 <= 1.2 * sync_p50))
        ms = [x * 1e3 for x, _ in lag]
        self.r.add(Figure(
            "asyncio_loop_lag_p99", f"event loop lag p99 during awaited submits "
            f"({len(lag):,} samples)", pct(ms, 0.99), "ms"))
        worst = max(ms)
        self.r.add(Figure("asyncio_loop_lag_max", "event loop lag max during awaited submits",
                          worst, "ms", target="<= 20 ms", passed=worst <= 20.0))
        busy = sorted(lag, reverse=True)[:max(1, len(lag) // 100)]  # the worst 1 %
        cpu_ms = [c * 1e3 for _, c in busy]
        self.r.details["asyncio"]["lag_worst_1pct_loop_cpu_ms"] = {
            "median": median(cpu_ms), "max": max(cpu_ms)}
        self.r.notes.append(
            f"asyncio loop lag: in the worst 1 % of samples (lag >= {busy[-1][0] * 1e3:.1f} ms) "
            f"the loop's thread itself ran {median(cpu_ms):.1f} ms (median; max "
            f"{max(cpu_ms):.1f} ms): the rest of such a lag is waiting for a core or the GIL, "
            f"not work on the loop (load average now {load_average()}); the longest garbage "
            f"collection in the process meanwhile took {max(gc_pauses, default=0) * 1e3:.1f} ms "
            f"({len(gc_pauses)} collections)")
        self.r.notes.append(
            f"asyncio client CPU per task (this process, all threads; median of {s.rounds}): "
            f"sync submit {median(cpu['sync']):.0f} us, awaited submit "
            f"{median(cpu['async']):.0f} us")

    def _sync_rate(self, n: int) -> float:
        t0 = time.perf_counter()
        futs = [self.cluster.submit(noop, i) for i in range(n)]
        done, _ = wait(futs, timeout=300)
        dt = time.perf_counter() - t0
        ok = len(done) == n and [f.result(0) for f in futs] == list(range(n))
        self.r.check("asyncio.sync_submit.results", ok, f"{len(done)} of {n} futures done")
        return n / dt

    async def _awaited(self, ac: Any, n: int) -> float:
        """``n`` tasks awaited by ``concurrency`` coroutines; tasks/s."""
        numbers = iter(range(n))
        got: list[int] = []
        bad: list[str] = []

        async def worker() -> None:
            for i in numbers:  # (shared: each coroutine takes the next number)
                r = await ac.submit(noop, i)
                if r != i:
                    bad.append(f"submit(noop, {i}) returned {r!r}")
                got.append(r)

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(self.sizes.concurrency))),
                               300)
        dt = time.perf_counter() - t0
        ok = not bad and sorted(got) == list(range(n))
        self.r.check("asyncio.awaited_submit.results", ok,
                     "; ".join(bad[:3]) or f"{len(got)} of {n} results")
        return n / dt

    async def _latency(self, ac: Any) -> tuple[float, float]:
        """p50 in microseconds of one task at a time: sync, then awaited (interleaved)."""
        samples: dict[str, list[float]] = {"sync": [], "async": []}
        bad: list[str] = []
        n = self.sizes.latency_samples
        rounds = 10
        per = max(1, n // rounds)
        clock = time.perf_counter
        counter = itertools.count()
        for _ in range(rounds):
            for _ in range(per):
                i = next(counter)
                t0 = clock()
                r = self.cluster.submit(noop, i).result(60)
                samples["sync"].append(clock() - t0)
                if r != i:
                    bad.append(f"sync submit(noop, {i}) returned {r!r}")
            for _ in range(per):
                i = next(counter)
                t0 = clock()
                r = await ac.submit(noop, i)  # (bounded: run() has a deadline)
                samples["async"].append(clock() - t0)
                if r != i:
                    bad.append(f"await submit(noop, {i}) returned {r!r}")
        self.r.check("asyncio.latency.results", not bad, "; ".join(bad[:3]))
        return median(samples["sync"]) * 1e6, median(samples["async"]) * 1e6


def run_section(cluster: Any, report: Report, sizes: AsyncSizes | None = None) -> None:
    """Measure the asyncio API on ``cluster`` (a sync :class:`~rpycsvc.Cluster`, left open)
    into ``report``. Failures become failed checks; nothing is raised. Runs its own event
    loop: call it from a thread that runs none."""
    t0 = time.perf_counter()
    try:
        asyncio.run(AsyncBench(cluster, sizes or AsyncSizes(), report).run())
    except Exception as exc:
        report.check("asyncio.ran", False, f"{type(exc).__name__}: {exc}")
    report.details.setdefault("workload_s", {})["asyncio"] = round(time.perf_counter() - t0, 2)


def run_asyncio(args: Any) -> int:
    """``rpycsvc bench --asyncio [HOST... | --local N]``: this section alone, printed like
    the full bench."""
    import os
    import platform

    import rpyc

    from rpycsvc.client.cluster import Cluster

    sizes = AsyncSizes.quick() if getattr(args, "quick", False) else AsyncSizes()
    report = Report()
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"timeout": 30.0, "output": "discard"}
    if getattr(args, "authkey", None):
        kw["authkey"] = args.authkey
    hosts = list(getattr(args, "hosts", None) or ())
    n_local = getattr(args, "local", None) or 2
    say(f"rpycsvc bench --asyncio: {'connecting to' if hosts else 'starting'} "
         f"{len(hosts) or n_local} {'' if hosts else 'local '}servers")
    cluster = Cluster(hosts, require_all=True, **kw) if hosts else Cluster.local(n_local, **kw)
    try:
        report.setup = {
            "servers": f"{len(cluster)} {'' if hosts else 'local '}servers "
                       f"({', '.join(cluster.addresses)})",
            "addresses": cluster.addresses, "workers": cluster.total_workers,
            "threads": cluster.total_threads, "python": platform.python_version(),
            "rpyc": getattr(rpyc, "__version__", "?"), "cores": os.cpu_count() or 1,
            "quick": bool(getattr(args, "quick", False)), "sizes": asdict(sizes),
            "load_start": load_average(), "raw_tcp_reference": "not measured (--asyncio)",
        }
        say("  asyncio: awaited submits vs sync submits, loop lag...")
        run_section(cluster, report, sizes)
    finally:
        cluster.close()
    report.setup["load_end"] = load_average()
    report.setup["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return finish(report, args)
