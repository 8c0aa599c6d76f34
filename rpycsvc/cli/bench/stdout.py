"""Workload ``stdout``: printed lines streamed to this terminal or captured, against discarded."""

from __future__ import annotations

import contextlib
import io
import time

from rpycsvc.cli.bench.measuring import median
from rpycsvc.cli.bench.report import Figure
from rpycsvc.cli.bench.tasks import print_lines
from rpycsvc.cli.bench.workload import BenchRun


def measure(bench: BenchRun) -> None:
    c = bench.client
    n = bench.sizes.stdout_lines
    want = [f"line {i}" for i in range(n)]

    def streamed() -> float:
        sink = _LineSink()
        with contextlib.redirect_stdout(sink):
            t0 = time.perf_counter()
            got = c.options(output="stream").submit(print_lines, n).result(120)
            t_done = time.perf_counter()
            deadline = t_done + 5
            while sink.lines < n and time.perf_counter() < deadline:
                time.sleep(0.01)
        dt = max(t_done, sink.last) - t0
        lines = [ln.rpartition("] ")[2] for ln in "".join(sink.parts).splitlines()]
        bench.report.check("stdout.streamed_lines", got == n and lines == want,
                           f"{len(lines)} of {n} lines arrived")
        # Not a failure, but worth knowing: a script that exits right after the result
        # would lose what had not arrived yet.
        early = sink.lines_at(t_done)
        bench.report.details.setdefault("stdout_lines_at_result", []).append(early)
        if early < n:
            bench.report.notes.append(f"stdout: only {early} of {n} lines had arrived when the "
                                      "result did; the rest came after it")
        return dt

    def discarded() -> float:
        t0 = time.perf_counter()
        got = c.options(output="discard").submit(print_lines, n).result(120)
        dt = time.perf_counter() - t0
        bench.report.check("stdout.discard_result", got == n)
        return dt

    def captured() -> float:
        t0 = time.perf_counter()
        fut = c.options(output="capture").submit(print_lines, n)
        got = fut.result(120)
        dt = time.perf_counter() - t0
        bench.report.check("stdout.captured_lines",
                           got == n and fut.stdout.splitlines() == want,
                           f"{len(fut.stdout.splitlines())} of {n} lines captured")
        return dt

    plan = {"stream": streamed, "discard": discarded, "capture": captured}
    for fn in plan.values():
        fn()  # warm-up
    secs: dict[str, list[float]] = {k: [] for k in plan}
    for _ in range(bench.sizes.stdout_runs):
        for k, fn in plan.items():
            secs[k].append(fn())
    med = {k: median(v) for k, v in secs.items()}
    bench.report.details["stdout_s"] = secs
    bench.report.add(Figure("stdout_stream", f"{n:,} printed lines, streamed", med["stream"] * 1e3,
                            "ms", "output discarded", med["discard"] * 1e3,
                            med["stream"] / med["discard"], "<= 2x",
                            med["stream"] <= 2 * med["discard"]))
    bench.report.add(Figure("stdout_capture", f"{n:,} printed lines, captured",
                            med["capture"] * 1e3, "ms", "output discarded",
                            med["discard"] * 1e3, med["capture"] / med["discard"]))



class _LineSink(io.TextIOBase):
    """Stands in for our stdout: keeps what arrives, counts lines, notes when they came."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.lines = 0
        self.last = 0.0
        self._marks: list[tuple[float, int]] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        self.lines += text.count("\n")
        self.last = time.perf_counter()
        self._marks.append((self.last, self.lines))
        return len(text)

    def flush(self) -> None:
        pass

    def lines_at(self, t: float) -> int:
        before = [n for when, n in self._marks if when <= t]
        return before[-1] if before else 0

