"""Measuring helpers shared by the workloads: medians, memory and CPU of processes, time limits.

Also the step runner (:func:`run_steps`) that runs the workloads of the main bench and the
steps of a section in turn, timing each and turning an exception into a failed check.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from rpycsvc.cli.bench.report import BenchError, Report, say
from rpycsvc.client.connect import parse_address

MB = 1e6


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def rss_self() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def watchdog(seconds: float, what: str, on_expire: Callable[[], None]) -> Iterator[None]:
    """Bound a call that takes no timeout: after ``seconds``, run ``on_expire`` (which makes
    the blocked call fail, e.g. by closing its connection) and report what hung."""
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        on_expire()

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Exception as exc:
        if fired.is_set():
            raise BenchError(f"{what} did not finish within {seconds:g} s") from exc
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise BenchError(f"{what} did not finish within {seconds:g} s")



class CpuMeter:
    """CPU seconds of this process and of one local server's processes (Linux /proc)."""

    _TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, server: int, workers: list[int]) -> None:
        self.server = server
        self.workers = workers

    @classmethod
    def of(cls, client: Any) -> CpuMeter | None:
        """A meter for ``client``'s server, or None when it is not on this host."""
        if not is_loopback(client.address):
            return None
        st = client.stats()
        workers = [p for p in [*st.get("worker_pids", ()), st.get("thread_worker_pid")] if p]
        return cls(st["pid"], workers) if proc_cpu(st["pid"]) is not None else None

    def read(self) -> dict[str, float]:
        return {"client": time.process_time(), "server": proc_cpu(self.server) or 0.0,
                "workers": sum(proc_cpu(p) or 0.0 for p in self.workers)}

    def add(self, into: dict[str, float], before: dict[str, float]) -> None:
        """Add the CPU seconds used since ``before`` to ``into``."""
        for k, v in self.read().items():
            into[k] = into.get(k, 0.0) + v - before[k]


def proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CpuMeter._TICK
    except (OSError, IndexError, ValueError):
        return None


def is_loopback(address: str) -> bool:
    return parse_address(address)[0] in ("127.0.0.1", "localhost", "::1")


def run_steps(steps: Mapping[str, Callable[[], Any]], report: Report, section: str = "") -> None:
    """``step()`` for each NAME: step of ``steps``, in turn: its seconds go in the report's
    ``workload_s``; an exception fails the check ``NAME.ran`` and the next step still runs
    (names are prefixed with ``section.`` when given). Shared by the main and the
    transports bench."""
    for name, step in steps.items():
        key = f"{section}.{name}" if section else name
        say(f"  {section}: {name}..." if section else f"  {name}...")
        t0 = time.perf_counter()
        try:
            step()
        except Exception as exc:
            report.check(f"{key}.ran", False, f"{type(exc).__name__}: {exc}")
        report.details.setdefault("workload_s", {})[key] = round(time.perf_counter() - t0, 2)


def timed_echo(call: Callable[[int], Any], what: Callable[[int], str],
               bad: list[str]) -> Callable[[int], float]:
    """A sample for the latency loops: ``one(i)`` returns the seconds ``call(i)`` took, and
    notes in ``bad`` (as ``what(i)`` and the reply) a reply other than ``i``: a wrong answer
    would make a fast figure meaningless. Shared by the main and the transports bench."""
    def one(i: int) -> float:
        t0 = time.perf_counter()
        got = call(i)
        dt = time.perf_counter() - t0
        if got != i:
            bad.append(f"{what(i)} returned {got!r}")
        return dt
    return one


def timed(fn: Callable[[int], Any], arg: int) -> float:
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


def bare_python_rss() -> int:
    code = ("import os, rpyc; "
            "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                             check=True)
        return int(out.stdout)
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        raise BenchError(f"could not measure a bare python's RSS: {exc}") from exc

