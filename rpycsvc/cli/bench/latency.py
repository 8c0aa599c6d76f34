"""Workload ``latency``: ``compute(noop)`` p50/p99 against a raw RPyC call and a 1-byte TCP echo.

The kinds are interleaved round by round (load drift hits each alike); on this host the CPU
per call of each process, and the request and reply legs against the server's clock, go in
the notes.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Callable

from rpycsvc.cli.bench.measuring import CpuMeter, is_loopback, median, pct, timed_echo, watchdog
from rpycsvc.cli.bench.raw_socket import RawPeer
from rpycsvc.cli.bench.report import Figure
from rpycsvc.cli.bench.tasks import noop, stamp
from rpycsvc.cli.bench.workload import BenchRun


def measure(bench: BenchRun) -> None:
    c = bench.client
    n = bench.sizes.latency_samples
    ping = c.conn.root.ping  # cached: one round trip per call
    raw = RawPeer(c)
    bench.report.setup["raw_tcp_reference"] = raw.where
    samples: dict[str, list[float]] = {"compute": [], "ping": [], "tcp": []}
    bad: list[str] = []

    kinds: dict[str, Callable[[int], float]] = {
        "compute": timed_echo(partial(c.compute, noop), lambda i: f"compute(noop, {i})", bad),
        "ping": timed_echo(ping, lambda i: f"ping({i})", bad),
        "tcp": lambda i: raw.ping()}
    # Where the time goes: the request and reply legs, timed against the server's clock
    # (only meaningful when the server shares our clock, i.e. runs on this host).
    legs: dict[str, list[tuple[float, float]]] = {"compute": [], "rpyc": []}
    if is_loopback(c.address):
        def leg(kind: str, call: Callable[[], float]) -> Callable[[int], float]:
            def one(i: int) -> float:
                t0 = time.perf_counter()
                there = call()
                t1 = time.perf_counter()
                legs[kind].append((there - t0, t1 - there))
                return t1 - t0
            return one

        kinds["compute_legs"] = leg("compute", lambda: c.compute(stamp))
        if c.server_info.get("classic", True):
            kinds["rpyc_legs"] = leg("rpyc", c.conn.modules.time.perf_counter)
    # compute() takes no timeout: a watchdog closes the connection if it hangs.
    with watchdog(120 + n * 0.05, "the latency loop", c.close):
        for fn in kinds.values():  # warm-up
            for i in range(min(200, n)):
                fn(i)
        rounds = 10
        per = max(1, n // rounds)
        meter = CpuMeter.of(c)
        cpu: dict[str, dict[str, float]] = {}
        for r in range(rounds):  # interleaved, so drift in machine load hits every kind
            for name, fn in kinds.items():
                before = meter.read() if meter else {}
                samples.setdefault(name, []).extend(fn(r * per + i) for i in range(per))
                if meter:
                    meter.add(cpu.setdefault(name, {}), before)
    counts = raw.close()
    if meter:
        cpu = {k: {p: x * 1e6 / (rounds * per) for p, x in v.items()} for k, v in cpu.items()}
        bench.report.details["latency_cpu_us_per_call"] = cpu
        bench.report.notes.append(
            "CPU per call, us (client / server process / its workers): " + "; ".join(
                f"{k} {v['client']:.0f} / {v['server']:.0f} / {v['workers']:.0f}"
                for k, v in cpu.items() if k in ("compute", "ping", "tcp")))
    bench.report.check("latency.results", not bad, "; ".join(bad[:3]))
    bench.report.check("latency.tcp_echo_count", counts.get("pings") == raw.pings,
                       f"echoed {counts.get('pings')} of {raw.pings}")
    us = {k: (median(v) * 1e6, pct(v, 0.99) * 1e6) for k, v in samples.items()}
    bench.report.details["latency_us"] = {k: {"p50": a, "p99": b, "samples": len(samples[k])}
                                          for k, (a, b) in us.items()}
    split = {k: (median([a for a, _ in v]) * 1e6, median([b for _, b in v]) * 1e6)
             for k, v in legs.items() if v}
    bench.report.details["latency_legs_us"] = split
    if split:
        names = {"compute": "compute(stamp)", "rpyc": "raw rpyc call"}
        bench.report.notes.append(
            "latency p50 legs, request / reply (timed against the server's clock): "
            + "; ".join(f"{names[k]} {a:.0f} / {b:.0f} us" for k, (a, b) in split.items()))
    p50, p99 = us["compute"]
    bench.compute_p50 = p50
    bench.report.add(Figure("compute_p50_vs_rpyc", "compute(noop) p50", p50, "us",
                            "cached raw rpyc ping p50", us["ping"][0], p50 / us["ping"][0],
                            "<= 1.3x", p50 / us["ping"][0] <= 1.3))
    bench.report.add(Figure("compute_p50_vs_tcp", "compute(noop) p50", p50, "us",
                            "1-byte TCP echo p50", us["tcp"][0], p50 / us["tcp"][0],
                            "<= 2.5x", p50 / us["tcp"][0] <= 2.5))
    bench.report.add(Figure("compute_p99", "compute(noop) p99", p99, "us",
                            "cached raw rpyc ping p99", us["ping"][1], p99 / us["ping"][1]))

