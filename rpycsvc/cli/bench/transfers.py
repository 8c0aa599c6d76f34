"""Workload ``transfers``: a large numpy array and bytes, up and down, against a raw TCP socket.

Every transfer is checked with CRC-32s on both ends; the time the far end spends computing
one is not counted as transfer time.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Callable

from rpycsvc.cli.bench.measuring import MB, CpuMeter, median
from rpycsvc.cli.bench.raw_socket import RawPeer
from rpycsvc.cli.bench.report import Figure
from rpycsvc.cli.bench.tasks import digest, make_blob
from rpycsvc.cli.bench.workload import BenchRun


def measure(bench: BenchRun) -> None:
    import numpy as np

    c = bench.client
    size = bench.sizes.transfer_bytes
    raw = RawPeer(c)
    rng = np.random.default_rng(1)
    payload: dict[str, Any] = {"numpy": rng.random(size // 8), "bytes": rng.bytes(size)}
    crcs = {k: zlib.crc32(memoryview(v).cast("B")) for k, v in payload.items()}
    timeout = max(120.0, size / (1 * MB))  # even at 1 MB/s
    seconds: dict[str, list[float]] = {}

    def up(kind: str) -> float:
        t0 = time.perf_counter()
        nbytes, crc, spent = c.submit(digest, payload[kind]).result(timeout)
        dt = time.perf_counter() - t0 - spent
        bench.report.check(f"transfer.{kind}_up", nbytes == size and crc == crcs[kind],
                           f"server saw {nbytes} bytes, CRC-32 {crc:#x}; sent {crcs[kind]:#x}")
        return dt

    def down(kind: str, seed: int) -> float:
        t0 = time.perf_counter()
        obj, crc, spent = c.submit(make_blob, kind, size, seed).result(timeout)
        dt = time.perf_counter() - t0 - spent
        ok_type = isinstance(obj, np.ndarray if kind == "numpy" else bytes)
        view = memoryview(obj).cast("B")
        bench.report.check(f"transfer.{kind}_down",
                           ok_type and view.nbytes == size and zlib.crc32(view) == crc,
                           f"got {type(obj).__name__} of {view.nbytes} bytes")
        return dt

    plan: dict[str, Callable[[int], float]] = {
        "raw_up": lambda i: raw.upload(payload["bytes"], crcs["bytes"]),
        "numpy_up": lambda i: up("numpy"),
        "bytes_up": lambda i: up("bytes"),
        "raw_down": lambda i: raw.download(size, 100 + i),
        "numpy_down": lambda i: down("numpy", 100 + i),
        "bytes_down": lambda i: down("bytes", 100 + i),
    }
    slow = False
    for fn in plan.values():  # warm-up, full size
        slow = fn(0) > 5.0 or slow
    runs = 1 if slow else bench.sizes.transfer_runs  # keep a regressed data path bounded
    meter = CpuMeter.of(c)
    cpu: dict[str, dict[str, float]] = {}
    for i in range(runs):
        for name, fn in plan.items():  # interleaved with the raw reference
            before = meter.read() if meter else {}
            seconds.setdefault(name, []).append(fn(i + 1))
            if meter:
                meter.add(cpu.setdefault(name, {}), before)
    counts = raw.close()
    if meter:
        cpu = {k: {p: x / runs for p, x in v.items()} for k, v in cpu.items()}
        bench.report.details["transfer_cpu_s"] = cpu
        bench.report.notes.append(
            f"CPU per {size >> 20} MiB transfer, s (client / server process / its workers; "
            "raw: the thread worker serves it): " + "; ".join(
                f"{k} {v['client']:.2f} / {v['server']:.2f} / {v['workers']:.2f}"
                for k, v in cpu.items()))
    bench.report.check("transfer.raw_counts",
                       counts.get("bytes_in") == size * (runs + 1)
                       and counts.get("bytes_out") == size * (runs + 1), str(counts))
    rate = {k: size / MB / median(v) for k, v in seconds.items()}
    payload.clear()
    trees = [st["rss_total_bytes"] for st in bench.server_stats()]
    bench.report.add(Figure("server_rss_after_transfers",
                            "largest server tree RSS after the transfers", max(trees) / MB, "MB",
                            "same, idle", bench.idle_tree / MB, max(trees) / bench.idle_tree))
    bench.report.details["transfer_mb_s"] = {k: [size / MB / x for x in v]
                                             for k, v in seconds.items()}
    mib = size >> 20
    for kind in ("numpy", "bytes"):
        for way, word in (("up", "sent"), ("down", "received")):
            key = f"{kind}_{way}"
            ratio = rate[key] / rate[f"raw_{way}"]
            what = "numpy array" if kind == "numpy" else "bytes"
            bench.report.add(Figure(key, f"{mib} MiB {what} {word}", rate[key], "MB/s",
                                    f"raw TCP socket {way}", rate[f"raw_{way}"], ratio,
                                    ">= 0.6x", ratio >= 0.6))

