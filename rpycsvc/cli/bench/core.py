"""``rpycsvc bench``: measure a live cluster against the performance targets, honestly.

Each figure is printed next to a reference measured in the same run on the same servers
(a raw RPyC call, a raw TCP socket, a serial run, a local thread pool...), with the ratio
and PASS/MISS against its target. Every workload checks its results (sums, lengths,
CRC-32s computed on both ends); a wrong result fails the run, a slow one only says MISS.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable

from rpycsvc.server.wire import _recv_exact

DESCRIPTION = """\
Measure a live cluster: the given servers (HOST[:PORT] ...), or N servers started here
with --local N (default 2) and stopped at the end. Prints a table of figures, each next
to a reference measured in the same run, their ratio, the target and PASS/MISS:

  compute latency     client.compute(noop) p50/p99 vs a cached raw RPyC call on the same
                      server, and vs a 1-byte TCP echo served by a thread-mode task there
  map                 tasks/s over 100,000 no-ops, time to the first result, client RSS
  200 x sleep(10 ms)  thread mode over every server vs a local 200-thread pool
  CPU speedup         16 pure-Python tasks of ~50 ms vs the same run serially here
  transfers           64 MiB numpy array and bytes, up and down, vs a raw TCP socket
  stdout              100,000 printed lines streamed vs discarded
  server memory       idle RSS; RSS after 100,000 and 200,000 map tasks
  transports          only with --transports (servers of its own; ~2 min): compute p50,
                      futures/s, 64 MiB up/down over plain TCP, authkey, TLS, SSH deployment
                      vs raw RPyC, raw TCP and ssl sockets and "ssh HOST cat"

Every workload verifies its results; a wrong result exits 1. Targets missed only show
MISS (add --fail-on-miss to exit 3 then). Numbers on a busy machine are noisy: compare
ratios, not absolutes. MB = 10^6 bytes."""

MB = 1e6
_LEN = struct.Struct("!Q")
#: Seconds any single socket operation of the raw reference may block.
RAW_TIMEOUT = 60.0


# -- tasks that run on the servers (module level, so they pickle by reference) -------------------

def noop(x: Any = None) -> Any:
    return x


def spin(n: int) -> int:
    """Pure-Python CPU work: ~n * 60 ns, holds the GIL throughout."""
    x = 0
    for i in range(n):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x


def stamp() -> float:
    """When the task ran, on the server's monotonic clock (the same clock as ours on one host)."""
    return time.perf_counter()


def spin_timed(n: int) -> tuple[int, float, float, int]:
    """spin(n), its wall and CPU seconds, and the worker's pid: how much of a core it got."""
    w0, c0 = time.perf_counter(), time.thread_time()
    x = spin(n)
    return x, time.perf_counter() - w0, time.thread_time() - c0, os.getpid()


def print_lines(n: int) -> int:
    for i in range(n):
        print(f"line {i}")
    return n


def digest(obj: Any) -> tuple[int, int, float]:
    """(bytes, CRC-32, seconds spent computing it) — the seconds are not transfer time."""
    t0 = time.perf_counter()
    view = memoryview(obj).cast("B")
    return view.nbytes, zlib.crc32(view), time.perf_counter() - t0


def make_blob(kind: str, nbytes: int, seed: int) -> tuple[Any, int, float]:
    """(a random numpy array or bytes of ``nbytes``, its CRC-32, seconds spent making it)."""
    t0 = time.perf_counter()
    if kind == "numpy":
        import numpy as np

        obj: Any = np.random.default_rng(seed).random(nbytes // 8)
    else:
        obj = _random_bytes(nbytes, seed)
    crc = zlib.crc32(memoryview(obj).cast("B"))
    return obj, crc, time.perf_counter() - t0


def _random_bytes(n: int, seed: int) -> bytes:
    try:
        import numpy as np

        return np.random.default_rng(seed).bytes(n)
    except ImportError:
        import random

        return random.Random(seed).randbytes(n)


# The raw TCP reference: a listener opened by one thread-mode task and served by the next
# (thread-mode tasks of a server share one worker process, hence this module's globals).
_LISTENERS: dict[str, socket.socket] = {}


def open_listener(host: str) -> tuple[str, int]:
    sock = socket.create_server((host, 0))
    sock.settimeout(RAW_TIMEOUT)
    token = uuid.uuid4().hex
    _LISTENERS[token] = sock
    return token, sock.getsockname()[1]


def serve_raw(token: str) -> dict[str, int]:
    sock = _LISTENERS.pop(token)
    try:
        conn, _ = sock.accept()
    finally:
        sock.close()
    with conn:
        return _raw_loop(conn)


def _raw_loop(conn: socket.socket) -> dict[str, int]:
    """One-byte opcodes: P echo, U upload, C crc of the upload, G make a blob, D send it, Q quit."""
    conn.settimeout(RAW_TIMEOUT)
    if conn.family in (socket.AF_INET, socket.AF_INET6):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    counts = {"pings": 0, "bytes_in": 0, "bytes_out": 0}
    last: Any = b""
    blob = b""
    while True:
        op = conn.recv(1)
        if op in (b"", b"Q"):
            return counts
        if op == b"P":
            conn.sendall(b"P")
            counts["pings"] += 1
        elif op == b"U":
            (n,) = _LEN.unpack(_recv_exact(conn, _LEN.size))
            last = _recv_exact(conn, n)
            conn.sendall(b"A")
            counts["bytes_in"] += n
        elif op == b"C":
            conn.sendall(_LEN.pack(zlib.crc32(last)))
        elif op == b"G":
            n, seed = struct.unpack("!QQ", _recv_exact(conn, 16))
            blob = _random_bytes(n, seed)
            conn.sendall(_LEN.pack(zlib.crc32(blob)))
        elif op == b"D":
            conn.sendall(blob)
            counts["bytes_out"] += len(blob)
        else:
            raise ValueError(f"raw reference: unknown opcode {op!r}")


def _raw_main() -> None:
    """The raw reference as a subprocess on 127.0.0.1 (when a server has no thread mode)."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(RAW_TIMEOUT)
    print(sock.getsockname()[1], flush=True)
    conn, _ = sock.accept()
    sock.close()
    with conn:
        print(json.dumps(_raw_loop(conn)), flush=True)


# -- results --------------------------------------------------------------------------------------

@dataclass
class Figure:
    key: str
    label: str
    value: float
    unit: str
    ref_label: str = ""
    ref_value: float | None = None
    ratio: float | None = None  # value / ref_value
    target: str = ""  # e.g. "<= 1.3x", ">= 50000/s"
    passed: bool | None = None  # None: no target
    ref_unit: str = ""  # when not the value's unit


@dataclass
class Report:
    setup: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        return fig

    def check(self, name: str, ok: bool, why: str = "") -> None:
        self.checks[name] = self.checks.get(name, True) and bool(ok)  # repeated: all must pass
        if not ok:
            self.errors.append(f"check failed: {name}" + (f": {why}" if why else ""))
            _say(f"  CHECK FAILED: {name} {why}")


class BenchError(Exception):
    """A workload produced a wrong result or could not run."""


@dataclass
class Sizes:
    latency_samples: int = 3000
    map_tasks: int = 100_000
    rpyc_pipelined: int = 5000
    sleep_runs: int = 5
    cpu_tasks: int = 16
    cpu_seconds: float = 0.05
    cpu_runs: int = 3
    transfer_bytes: int = 64 << 20
    transfer_runs: int = 3
    stdout_lines: int = 100_000
    stdout_runs: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(latency_samples=300, map_tasks=2000, rpyc_pipelined=500, sleep_runs=2,
                   cpu_tasks=8, cpu_seconds=0.02, cpu_runs=1, transfer_bytes=4 << 20,
                   transfer_runs=2, stdout_lines=5000, stdout_runs=2)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _rss_self() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def _watchdog(seconds: float, what: str, on_expire: Callable[[], None]) -> Iterator[None]:
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


# -- the raw TCP reference, client side -----------------------------------------------------------

class RawPeer:
    """A plain TCP connection to the raw reference server (see :func:`_raw_loop`)."""

    def __init__(self, client: Any, timeout: float = 30.0) -> None:
        from rpycsvc.client.connect import parse_address

        self._fut: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        host, _ = parse_address(client.address)
        if client.threads > 0:
            opts = client.options(mode="thread")
            token, port = opts.submit(open_listener, host).result(timeout)
            self._fut = opts.submit(serve_raw, token)
            self.where = f"a thread-mode task on {client.address} (its thread worker process)"
        else:
            host = "127.0.0.1"
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "import rpycsvc.cli.bench.core as b; b._raw_main()"],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            port = int(_readline(self._proc, timeout))
            self.where = "a subprocess on 127.0.0.1 (the server has no thread mode)"
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(RAW_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pings = 0

    def ping(self) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(b"P")
        if self.sock.recv(1) != b"P":
            raise BenchError("raw TCP echo returned the wrong byte")
        dt = time.perf_counter() - t0
        self.pings += 1
        return dt

    def upload(self, data: Any, crc: int) -> float:
        view = memoryview(data).cast("B")
        t0 = time.perf_counter()
        self.sock.sendall(b"U" + _LEN.pack(view.nbytes))
        self.sock.sendall(view)
        if _recv_exact(self.sock, 1) != b"A":
            raise BenchError("raw upload: bad acknowledgement")
        dt = time.perf_counter() - t0
        self.sock.sendall(b"C")
        (got,) = _LEN.unpack(_recv_exact(self.sock, _LEN.size))
        if got != crc:
            raise BenchError(f"raw upload: CRC-32 {got:#x} on the far side, {crc:#x} here")
        return dt

    def download(self, nbytes: int, seed: int) -> float:
        self.sock.sendall(b"G" + struct.pack("!QQ", nbytes, seed))
        (crc,) = _LEN.unpack(_recv_exact(self.sock, _LEN.size))
        t0 = time.perf_counter()
        self.sock.sendall(b"D")
        data = _recv_exact(self.sock, nbytes)
        dt = time.perf_counter() - t0
        if zlib.crc32(data) != crc:
            raise BenchError("raw download: CRC-32 mismatch")
        return dt

    def close(self, timeout: float = 30.0) -> dict[str, int]:
        """Stop the far side; returns its counts (pings echoed, bytes in and out)."""
        try:
            self.sock.sendall(b"Q")
        finally:
            self.sock.close()
        if self._fut is not None:
            counts: dict[str, int] = self._fut.result(timeout)
            return counts
        assert self._proc is not None
        try:
            line = _readline(self._proc, timeout)
            return dict(json.loads(line))
        finally:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            if self._proc.stdout is not None:
                self._proc.stdout.close()


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise BenchError(f"raw reference subprocess said nothing within {timeout:g} s")
        return proc.stdout.readline().decode().strip()
    finally:
        sel.close()


# -- workloads ---------------------------------------------------------------------------------

class Bench:
    def __init__(self, cluster: Any, sizes: Sizes, report: Report, local: bool) -> None:
        self.cluster = cluster
        self.sizes = sizes
        self.r = report
        self.local = local
        self.client = cluster.clients[0]
        self.compute_p50 = 0.0
        self.idle_tree = 0

    # -- server memory, idle ---------------------------------------------------------------------
    def memory_idle(self) -> None:
        time.sleep(0.5)  # let freshly started workers settle
        stats = self._stats()
        rss = max(s["rss_bytes"] for s in stats)
        tree = max(s["rss_total_bytes"] for s in stats)
        self.idle_tree = tree
        bare = _bare_python_rss()
        self.r.details["idle_stats"] = [
            {k: s[k] for k in ("address", "rss_bytes", "rss_total_bytes", "worker_pids",
                               "thread_worker_pid") if k in s} for s in stats]
        self.r.check("memory.idle_stats", rss > 0 and tree >= rss, f"rss={rss} tree={tree}")
        self.r.add(Figure("server_idle_rss", "server RSS idle (largest server process)",
                          rss / MB, "MB", "bare python + import rpyc", bare / MB,
                          rss / bare, "<= 60 MB", rss <= 60 * MB))
        procs = max(1 + len(s.get("worker_pids") or ()) + bool(s.get("thread_worker_pid"))
                    for s in stats)
        self.r.add(Figure("server_idle_tree_rss",
                          f"server tree RSS idle (server + workers, {procs} processes)",
                          tree / MB, "MB", f"{procs} x bare python", procs * bare / MB,
                          tree / (procs * bare)))

    def _stats(self) -> list[dict[str, Any]]:
        out = []
        for c in self.cluster.clients:
            s = c.stats()
            s.setdefault("address", c.address)
            out.append(s)
        if len(out) != len(self.cluster):
            raise BenchError(f"only {len(out)} of {len(self.cluster)} servers answered stats()")
        return out

    # -- latency -----------------------------------------------------------------------------------
    def latency(self) -> None:
        c = self.client
        n = self.sizes.latency_samples
        ping = c.conn.root.ping  # cached: one round trip per call
        raw = RawPeer(c)
        self.r.setup["raw_tcp_reference"] = raw.where
        samples: dict[str, list[float]] = {"compute": [], "ping": [], "tcp": []}
        bad: list[str] = []

        kinds: dict[str, Callable[[int], float]] = {
            "compute": _timed_echo(partial(c.compute, noop), lambda i: f"compute(noop, {i})", bad),
            "ping": _timed_echo(ping, lambda i: f"ping({i})", bad),
            "tcp": lambda i: raw.ping()}
        # Where the time goes: the request and reply legs, timed against the server's clock
        # (only meaningful when the server shares our clock, i.e. runs on this host).
        legs: dict[str, list[tuple[float, float]]] = {"compute": [], "rpyc": []}
        if _is_loopback(c.address):
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
        with _watchdog(120 + n * 0.05, "the latency loop", c.close):
            for fn in kinds.values():  # warm-up
                for i in range(min(200, n)):
                    fn(i)
            rounds = 10
            per = max(1, n // rounds)
            meter = _CpuMeter.of(c)
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
            self.r.details["latency_cpu_us_per_call"] = cpu
            self.r.notes.append(
                "CPU per call, us (client / server process / its workers): " + "; ".join(
                    f"{k} {v['client']:.0f} / {v['server']:.0f} / {v['workers']:.0f}"
                    for k, v in cpu.items() if k in ("compute", "ping", "tcp")))
        self.r.check("latency.results", not bad, "; ".join(bad[:3]))
        self.r.check("latency.tcp_echo_count", counts.get("pings") == raw.pings,
                     f"echoed {counts.get('pings')} of {raw.pings}")
        us = {k: (_median(v) * 1e6, _pct(v, 0.99) * 1e6) for k, v in samples.items()}
        self.r.details["latency_us"] = {k: {"p50": a, "p99": b, "samples": len(samples[k])}
                                        for k, (a, b) in us.items()}
        split = {k: (_median([a for a, _ in v]) * 1e6, _median([b for _, b in v]) * 1e6)
                 for k, v in legs.items() if v}
        self.r.details["latency_legs_us"] = split
        if split:
            names = {"compute": "compute(stamp)", "rpyc": "raw rpyc call"}
            self.r.notes.append(
                "latency p50 legs, request / reply (timed against the server's clock): "
                + "; ".join(f"{names[k]} {a:.0f} / {b:.0f} us" for k, (a, b) in split.items()))
        p50, p99 = us["compute"]
        self.compute_p50 = p50
        self.r.add(Figure("compute_p50_vs_rpyc", "compute(noop) p50", p50, "us",
                          "cached raw rpyc ping p50", us["ping"][0], p50 / us["ping"][0],
                          "<= 1.3x", p50 / us["ping"][0] <= 1.3))
        self.r.add(Figure("compute_p50_vs_tcp", "compute(noop) p50", p50, "us",
                          "1-byte TCP echo p50", us["tcp"][0], p50 / us["tcp"][0],
                          "<= 2.5x", p50 / us["tcp"][0] <= 2.5))
        self.r.add(Figure("compute_p99", "compute(noop) p99", p99, "us",
                          "cached raw rpyc ping p99", us["ping"][1], p99 / us["ping"][1]))

    # -- map throughput and server memory under load ----------------------------------------------
    def map_and_memory(self) -> None:
        n = self.sizes.map_tasks
        cl = self.cluster
        warm = list(cl.map(noop, range(min(n, 2000)), timeout=60))
        self.r.check("map.warmup", warm == list(range(min(n, 2000))))
        runs = []
        after = []
        for run in range(2):
            runs.append(self._one_map(n, run))
            after.append(sum(s["rss_total_bytes"] for s in self._stats()))
        rates = [x["rate"] for x in runs]
        rate = _median(rates)
        ref = self._rpyc_pipelined()
        self.r.details["map_runs"] = runs
        self.r.add(Figure("map_throughput", f"map of {n:,} no-ops (median of 2)", rate,
                          "tasks/s", "pipelined raw rpyc pings (1 server)", ref, rate / ref,
                          ">= 50,000/s", rate >= 50_000))
        servers = len(self.cluster.clients)
        self.r.add(Figure("map_client_cpu", f"map: client CPU per item, {servers} servers",
                          _median([x["client_cpu_us"] for x in runs]), "us",
                          "", None,
                          None))
        first = _median([x["first_s"] for x in runs]) * 1e3
        self.r.add(Figure("map_first_result", "map: time to first result", first, "ms",
                          "compute(noop) p50", self.compute_p50 / 1e3,
                          first / (self.compute_p50 / 1e3) if self.compute_p50 else None))
        m = max(100, n // 20)
        sub = self._submit_rate(m)
        self.r.add(Figure("submit_throughput", f"{m:,} submit(noop) futures, no batching", sub,
                          "tasks/s", "pipelined raw rpyc pings (1 server)", ref, sub / ref))
        peak = max(x["rss_peak"] for x in runs)
        before = runs[0]["rss_before"]
        self.r.add(Figure("map_client_rss", "client RSS peak during the maps", peak / MB, "MB",
                          "client RSS before", before / MB, peak / before))
        self.r.add(Figure("server_rss_growth",
                          f"server trees' RSS after {2 * n:,} map tasks", after[1] / MB, "MB",
                          f"after {n:,}", after[0] / MB, after[1] / after[0],
                          "<= 1.05x (bounded)", after[1] <= 1.05 * after[0]))

    def _one_map(self, n: int, run: int) -> dict[str, float]:
        rss_before = peak = _rss_self()
        total = count = 0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        it = self.cluster.map(noop, range(n), timeout=120)
        first = next(it)
        t_first = time.perf_counter() - t0
        total, count = first, 1
        for x in it:
            total += x
            count += 1
            if not count & 4095:
                peak = max(peak, _rss_self())
        dt = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        peak = max(peak, _rss_self())
        self.r.check(f"map.run{run}.results", count == n and total == n * (n - 1) // 2,
                     f"{count} results summing to {total}")
        return {"seconds": dt, "rate": n / dt, "first_s": t_first, "rss_before": rss_before,
                "rss_peak": peak, "client_cpu_us": cpu / n * 1e6}

    def _submit_rate(self, n: int) -> float:
        from concurrent.futures import wait

        for warm in (True, False):
            k = min(n, 500) if warm else n
            t0 = time.perf_counter()
            futs = [self.cluster.submit(noop, i) for i in range(k)]
            done, _ = wait(futs, timeout=120)
            dt = time.perf_counter() - t0
            ok = len(done) == k and [f.result(0) for f in futs] == list(range(k))
            self.r.check("submit.results", ok, f"{len(done)} of {k} futures done")
        return n / dt

    def _rpyc_pipelined(self) -> float:
        import rpyc

        n = self.sizes.rpyc_pipelined
        aping = rpyc.async_(self.client.conn.root.ping)
        for warm in (True, False):
            t0 = time.perf_counter()
            res = [aping(i) for i in range(n)]
            for r in res:
                r.set_expiry(60)
            got = [r.value for r in res]
            dt = time.perf_counter() - t0
            if not warm:
                self.r.check("map.rpyc_pipelined", got == list(range(n)))
        return n / dt

    # -- many short sleeps in thread mode -------------------------------------------------------
    def sleeps(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        args = [0.01] * 200
        opts = self.cluster.options(mode="thread")

        def remote() -> float:
            t0 = time.perf_counter()
            out = list(opts.map(time.sleep, args, timeout=60))
            dt = time.perf_counter() - t0
            self.r.check("sleep.results", out == [None] * len(args), f"{len(out)} results")
            return dt

        with ThreadPoolExecutor(len(args)) as pool:
            def local() -> float:
                t0 = time.perf_counter()
                out = list(pool.map(time.sleep, args, timeout=60))
                dt = time.perf_counter() - t0
                self.r.check("sleep.local_results", len(out) == len(args))
                return dt

            remote()
            local()  # warm-ups (the pool's threads exist from now on)
            rt, lt = [], []
            for _ in range(self.sizes.sleep_runs):
                rt.append(remote())
                lt.append(local())
        ms, ref = _median(rt) * 1e3, _median(lt) * 1e3
        self.r.details["sleep_ms"] = {"remote": [x * 1e3 for x in rt],
                                      "local": [x * 1e3 for x in lt]}
        self.r.add(Figure("sleep_200x10ms", "200 x sleep(10 ms), thread mode", ms, "ms",
                          "local 200-thread pool", ref, ms / ref, "<= 40 ms", ms <= 40))

    # -- CPU-bound speedup ----------------------------------------------------------------------
    def cpu(self) -> None:
        s = self.sizes
        spin(10_000)
        probe = 200_000
        t = min(_timed(spin, probe) for _ in range(3))
        n = max(1000, int(probe * s.cpu_seconds / t))
        args = [n + k for k in range(s.cpu_tasks)]
        want = [spin(a) for a in args]  # also the warm-up of the serial run
        workers = self.cluster.total_workers
        runs: dict[str, list[dict[str, float]]] = {"cluster": [], "pool": []}

        def parallel(kind: str, mapper: Callable[..., Any]) -> float:
            t0 = time.perf_counter()
            out = list(mapper(spin_timed, args, timeout=120))
            dt = time.perf_counter() - t0
            self.r.check(f"cpu.{kind}_results", [x[0] for x in out] == want)
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
            self.r.check("cpu.serial_results", got == want)
            return dt

        # The same tasks on a local process pool of the same size, interleaved: what this
        # machine can give right now (other load on a shared box shows up here too).
        pool = None
        if self.local:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            plan: dict[str, Callable[[], float]] = {
                "serial": serial, "cluster": lambda: parallel("cluster", self.cluster.map)}
            if pool is not None:
                plan["pool"] = lambda: parallel("pool", pool.map)
            for kind in ("cluster", "pool"):  # warm-ups
                if kind in plan:
                    plan[kind]()
                    runs[kind].clear()
            secs: dict[str, list[float]] = {k: [] for k in plan}
            meter = _CpuMeter.of(self.client)
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
        med = {k: _median(v) for k, v in secs.items()}
        speedup = med["serial"] / med["cluster"]
        ideal = min(workers, os.cpu_count() or 1) if self.local else workers
        ideal = min(ideal, s.cpu_tasks)
        self.r.details["cpu"] = {"n": n, "task_ms": med["serial"] / len(args) * 1e3,
                                 "seconds": secs, "runs": runs, "workers": workers,
                                 "serial_core_share": serial_share}
        for kind, what in (("cluster", "rpycsvc workers"), ("pool", "local pool")):
            if runs[kind]:
                share = _median([r["core_share"] for r in runs[kind]])
                beyond = _median([r["wall"] - r["busiest"] for r in runs[kind]])
                self.r.notes.append(
                    f"cpu, {what}: tasks got {share:.0%} of a core while running; a run took "
                    f"{beyond * 1e3:.0f} ms beyond its busiest process's task time")
        if spent:
            self.r.notes.append(
                f"cpu: CPU outside the tasks per rpycsvc run: this client "
                f"{spent['client'] / s.cpu_runs * 1e3:.0f} ms, server process of "
                f"{self.client.address} {spent['server'] / s.cpu_runs * 1e3:.0f} ms "
                f"(serial run here got {_median(serial_share):.0%} of a core)")
        label = f"{len(args)} CPU tasks of ~{s.cpu_seconds * 1e3:.0f} ms"
        self.r.add(Figure("cpu_speedup", f"{label}: speedup (parallel {med['cluster']:.2f} s)",
                          speedup, "x", "serial here", med["serial"], None,
                          f">= {0.95 * ideal:.2f}x ({ideal} workers)", speedup >= 0.95 * ideal,
                          ref_unit="s"))
        if "pool" in med:
            pool_speedup = med["serial"] / med["pool"]
            self.r.add(Figure("cpu_speedup_vs_pool", "CPU speedup vs what a local pool got",
                              speedup, "x", f"ProcessPoolExecutor({workers})", pool_speedup,
                              speedup / pool_speedup))

    # -- large transfers --------------------------------------------------------------------------
    def transfers(self) -> None:
        import numpy as np

        c = self.client
        size = self.sizes.transfer_bytes
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
            self.r.check(f"transfer.{kind}_up", nbytes == size and crc == crcs[kind],
                         f"server saw {nbytes} bytes, CRC-32 {crc:#x}; sent {crcs[kind]:#x}")
            return dt

        def down(kind: str, seed: int) -> float:
            t0 = time.perf_counter()
            obj, crc, spent = c.submit(make_blob, kind, size, seed).result(timeout)
            dt = time.perf_counter() - t0 - spent
            ok_type = isinstance(obj, np.ndarray if kind == "numpy" else bytes)
            view = memoryview(obj).cast("B")
            self.r.check(f"transfer.{kind}_down",
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
        runs = 1 if slow else self.sizes.transfer_runs  # keep a regressed data path bounded
        meter = _CpuMeter.of(c)
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
            self.r.details["transfer_cpu_s"] = cpu
            self.r.notes.append(
                f"CPU per {size >> 20} MiB transfer, s (client / server process / its workers; "
                "raw: the thread worker serves it): " + "; ".join(
                    f"{k} {v['client']:.2f} / {v['server']:.2f} / {v['workers']:.2f}"
                    for k, v in cpu.items()))
        self.r.check("transfer.raw_counts",
                     counts.get("bytes_in") == size * (runs + 1)
                     and counts.get("bytes_out") == size * (runs + 1), str(counts))
        rate = {k: size / MB / _median(v) for k, v in seconds.items()}
        payload.clear()
        trees = [st["rss_total_bytes"] for st in self._stats()]
        self.r.add(Figure("server_rss_after_transfers",
                          "largest server tree RSS after the transfers", max(trees) / MB, "MB",
                          "same, idle", self.idle_tree / MB, max(trees) / self.idle_tree))
        self.r.details["transfer_mb_s"] = {k: [size / MB / x for x in v]
                                           for k, v in seconds.items()}
        mib = size >> 20
        for kind in ("numpy", "bytes"):
            for way, word in (("up", "sent"), ("down", "received")):
                key = f"{kind}_{way}"
                ratio = rate[key] / rate[f"raw_{way}"]
                what = "numpy array" if kind == "numpy" else "bytes"
                self.r.add(Figure(key, f"{mib} MiB {what} {word}", rate[key], "MB/s",
                                  f"raw TCP socket {way}", rate[f"raw_{way}"], ratio,
                                  ">= 0.6x", ratio >= 0.6))

    # -- stdout ------------------------------------------------------------------------------------
    def stdout(self) -> None:
        c = self.client
        n = self.sizes.stdout_lines
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
            self.r.check("stdout.streamed_lines", got == n and lines == want,
                         f"{len(lines)} of {n} lines arrived")
            # Not a failure, but worth knowing: a script that exits right after the result
            # would lose what had not arrived yet.
            early = sink.lines_at(t_done)
            self.r.details.setdefault("stdout_lines_at_result", []).append(early)
            if early < n:
                self.r.notes.append(f"stdout: only {early} of {n} lines had arrived when the "
                                    "result did; the rest came after it")
            return dt

        def discarded() -> float:
            t0 = time.perf_counter()
            got = c.options(output="discard").submit(print_lines, n).result(120)
            dt = time.perf_counter() - t0
            self.r.check("stdout.discard_result", got == n)
            return dt

        def captured() -> float:
            t0 = time.perf_counter()
            fut = c.options(output="capture").submit(print_lines, n)
            got = fut.result(120)
            dt = time.perf_counter() - t0
            self.r.check("stdout.captured_lines",
                         got == n and fut.stdout.splitlines() == want,
                         f"{len(fut.stdout.splitlines())} of {n} lines captured")
            return dt

        plan = {"stream": streamed, "discard": discarded, "capture": captured}
        for fn in plan.values():
            fn()  # warm-up
        secs: dict[str, list[float]] = {k: [] for k in plan}
        for _ in range(self.sizes.stdout_runs):
            for k, fn in plan.items():
                secs[k].append(fn())
        med = {k: _median(v) for k, v in secs.items()}
        self.r.details["stdout_s"] = secs
        self.r.add(Figure("stdout_stream", f"{n:,} printed lines, streamed", med["stream"] * 1e3,
                          "ms", "output discarded", med["discard"] * 1e3,
                          med["stream"] / med["discard"], "<= 2x",
                          med["stream"] <= 2 * med["discard"]))
        self.r.add(Figure("stdout_capture", f"{n:,} printed lines, captured",
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


class _CpuMeter:
    """CPU seconds of this process and of one local server's processes (Linux /proc)."""

    _TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, server: int, workers: list[int]) -> None:
        self.server = server
        self.workers = workers

    @classmethod
    def of(cls, client: Any) -> _CpuMeter | None:
        """A meter for ``client``'s server, or None when it is not on this host."""
        if not _is_loopback(client.address):
            return None
        st = client.stats()
        workers = [p for p in [*st.get("worker_pids", ()), st.get("thread_worker_pid")] if p]
        return cls(st["pid"], workers) if _proc_cpu(st["pid"]) is not None else None

    def read(self) -> dict[str, float]:
        return {"client": time.process_time(), "server": _proc_cpu(self.server) or 0.0,
                "workers": sum(_proc_cpu(p) or 0.0 for p in self.workers)}

    def add(self, into: dict[str, float], before: dict[str, float]) -> None:
        """Add the CPU seconds used since ``before`` to ``into``."""
        for k, v in self.read().items():
            into[k] = into.get(k, 0.0) + v - before[k]


def _proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CpuMeter._TICK
    except (OSError, IndexError, ValueError):
        return None


def _is_loopback(address: str) -> bool:
    from rpycsvc.client.connect import parse_address

    return parse_address(address)[0] in ("127.0.0.1", "localhost", "::1")


def _run_steps(target: Any, names: Iterable[str], report: Report, section: str = "") -> None:
    """``target.NAME()`` for each name, in turn: its seconds go in the report's
    ``workload_s``; an exception fails the check ``NAME.ran`` and the next step still runs
    (names are prefixed with ``section.`` when given). Shared by the main and the
    transports bench."""
    for name in names:
        key = f"{section}.{name}" if section else name
        _say(f"  {section}: {name}..." if section else f"  {name}...")
        t0 = time.perf_counter()
        try:
            getattr(target, name)()
        except Exception as exc:
            report.check(f"{key}.ran", False, f"{type(exc).__name__}: {exc}")
        report.details.setdefault("workload_s", {})[key] = round(time.perf_counter() - t0, 2)


def _timed_echo(call: Callable[[int], Any], what: Callable[[int], str],
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


def _timed(fn: Callable[[int], Any], arg: int) -> float:
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


def _bare_python_rss() -> int:
    code = ("import os, rpyc; "
            "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                             check=True)
        return int(out.stdout)
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        raise BenchError(f"could not measure a bare python's RSS: {exc}") from exc


# -- output ------------------------------------------------------------------------------------

def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit in ("tasks/s",):
        return f"{value:,.0f}/s"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    if abs(value) >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.2f} {unit}"


def render(report: Report) -> str:
    s = report.setup
    lines = [
        f"rpycsvc bench: {s['servers']} | {s['workers']} process workers, "
        f"{s['threads']} thread slots | python {s['python']}, rpyc {s['rpyc']}, "
        f"{s['cores']} cores | {'quick' if s['quick'] else 'full'} sizes",
        f"load average at start {s['load_start']}, at end {s.get('load_end', '?')}; "
        f"took {s.get('elapsed_s', 0):.0f} s",
        f"raw TCP reference: served by {s.get('raw_tcp_reference', '?')}",
        "",
    ]
    rows = [("figure", "value", "reference", "ratio", "target", "result")]
    for f in report.figures:
        ref = f"{f.ref_label}: {_fmt(f.ref_value, f.ref_unit or f.unit)}" if f.ref_label else "-"
        result = "-" if f.passed is None else ("PASS" if f.passed else "MISS")
        rows.append((f.label, _fmt(f.value, f.unit), ref,
                     "-" if f.ratio is None else f"{f.ratio:.2f}x", f.target or "-", result))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    failed = [k for k, ok in report.checks.items() if not ok]
    lines.append("")
    lines.append(f"correctness: {len(report.checks) - len(failed)} of {len(report.checks)} "
                 "checks passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    for err in report.errors:
        lines.append(f"ERROR: {err}")
    for note in report.notes:
        lines.append(textwrap.fill(f"note: {note}", 100, subsequent_indent="      "))
    misses = [f.key for f in report.figures if f.passed is False]
    lines.append(f"targets: {sum(f.passed is True for f in report.figures)} PASS, "
                 f"{len(misses)} MISS" + (f" ({', '.join(misses)})" if misses else ""))
    return "\n".join(lines)


# -- command -----------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hosts", nargs="*", metavar="HOST",
                   help="servers to measure (host[:port]); default: --local 2")
    p.add_argument("--local", type=int, default=None, metavar="N",
                   help="start N servers on 127.0.0.1, measure them, stop them (default: 2 "
                   "when no HOST is given)")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON instead of the table (default: off)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (2,000 tasks, 4 MiB...): same code paths, for tests "
                   "(default: off, full sizes)")
    p.add_argument("--fail-on-miss", action="store_true",
                   help="exit 3 when a target is missed (default: off, a miss only shows "
                   "MISS in the table)")
    p.add_argument("--transports", action="store_true",
                   help="only the transports section, on servers it starts itself (plain TCP, "
                   "authkey, TLS, SSH deployment to a private sshd); HOSTs and --local are "
                   "not used (default: off)")
    p.add_argument("--asyncio", action="store_true",
                   help="only the asyncio section: awaited submits vs sync submits (throughput, "
                   "p50) and the event loop's lag, on HOSTs or --local N (default: off)")
    p.add_argument("--authkey", default=None,
                   help="the servers' shared secret, for HOSTs that need one (default: "
                   "RPYCSVC_AUTHKEY, or none; prefer the variable: command lines are "
                   "visible to other users)")


WORKLOADS = ("memory_idle", "latency", "map_and_memory", "sleeps", "cpu", "stdout", "transfers")


def run(args: argparse.Namespace) -> int:
    import platform

    import rpyc

    from rpycsvc.client.cluster import Cluster
    from rpycsvc.errors import ConfigError

    if args.hosts and args.local:
        raise ConfigError("give HOSTs or --local N, not both")
    if getattr(args, "transports", False):
        from rpycsvc.cli.bench.transports import run_transports

        if args.hosts or args.local:
            raise ConfigError("--transports starts servers of its own: leave out HOSTs and --local")

        return run_transports(args)
    if getattr(args, "asyncio", False):
        from rpycsvc.cli.bench.asyncio_section import run_asyncio

        return run_asyncio(args)
    local = not args.hosts
    n_local = 2 if args.local is None else args.local
    if local and n_local < 1:
        raise ConfigError(f"--local needs N >= 1; got {n_local!r}")
    sizes = Sizes.quick() if args.quick else Sizes()
    report = Report()
    t_start = time.perf_counter()
    kw: dict[str, Any] = {"timeout": 30.0}
    if args.authkey:
        kw["authkey"] = args.authkey
    _say(f"rpycsvc bench: starting {n_local} local servers" if local
         else f"rpycsvc bench: connecting to {len(args.hosts)} servers")
    cluster = Cluster.local(n_local, **kw) if local else Cluster(args.hosts, require_all=True, **kw)
    try:
        report.setup = {
            "servers": (f"{len(cluster)} local servers" if local else f"{len(cluster)} servers")
            + f" ({', '.join(cluster.addresses)})",
            "addresses": cluster.addresses,
            "workers": cluster.total_workers,
            "threads": cluster.total_threads,
            "python": platform.python_version(),
            "rpyc": rpyc.__version__ if hasattr(rpyc, "__version__") else "?",
            "cores": os.cpu_count() or 1,
            "quick": bool(args.quick),
            "sizes": asdict(sizes),
            "load_start": _load(),
        }
        bench = Bench(cluster, sizes, report, local)
        _run_steps(bench, WORKLOADS, report)
    finally:
        cluster.close()
    report.setup["load_end"] = _load()
    report.setup["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return finish(report, args)


def finish(report: Report, args: argparse.Namespace) -> int:
    """Print the table (or JSON) and return the exit status."""
    ok = all(report.checks.values())
    if args.json:
        doc = {"ok": ok, "setup": report.setup,
               "figures": {f.key: asdict(f) for f in report.figures},
               "checks": report.checks, "errors": report.errors, "notes": report.notes,
               "details": report.details}
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(render(report))
    if not ok:
        _say("rpycsvc bench: FAILED: some results were wrong or a workload did not run "
             "(see the errors above); the figures of those workloads mean nothing")
        return 1
    if args.fail_on_miss and any(f.passed is False for f in report.figures):
        return 3
    return 0


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
