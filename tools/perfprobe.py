"""Per-process CPU cost of one sync task on plain TCP (a research tool, not a test).

Starts ``rpycsvc serve --workers 2`` on 127.0.0.1, connects one client, and runs
interleaved rounds of ``client.compute(noop, i)`` and a cached raw RPyC ``conn.root.ping(i)``
on the same connection. For each round it records the wall p50 and the CPU time per call
of the client (``time.process_time``), the server (every thread, from
``/proc/PID/task/*/schedstat``, nanoseconds) and the workers (the same). The machine is
shared, so CPU per call, not wall time, is the figure to compare; the p50 ratio is measured
interleaved in the same run as the bench does.

    PYTHONPATH=. python tools/perfprobe.py [--calls 5000] [--rounds 3] [--threads]

``--threads`` also prints the server's CPU per call by thread name (which thread pays).
``--profile DIR``: every process writes a cProfile of the compute rounds to DIR (the server
and its workers through the RPYCSVC_PERFPROBE_PROFILE hook in tools/perfhook.py, which the
probe puts in front of the server's ``sitecustomize``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def thread_cpu(pid: int) -> dict[str, int]:
    """Nanoseconds of CPU by thread (name:tid) of process ``pid`` (live threads)."""
    out: dict[str, int] = {}
    base = Path(f"/proc/{pid}/task")
    for t in base.iterdir():
        try:
            ns = int((t / "schedstat").read_text().split()[0])
            name = (t / "comm").read_text().strip()
        except OSError:
            continue
        out[f"{name}:{t.name}"] = ns
    return out


def proc_cpu(pid: int) -> int:
    """CPU nanoseconds of process ``pid`` so far, all threads, dead ones included
    (utime+stime from /proc/PID/stat, in clock ticks; live threads' schedstat is finer)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks * (10**9 // os.sysconf("SC_CLK_TCK"))


def total_ns(pid: int) -> int:
    return sum(thread_cpu(pid).values())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", action="store_true")
    ap.add_argument("--profile", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--strace", default="", help="strace -c -f the server (and --strace-worker"
                    " one worker) during the compute rounds; summary written to this prefix")
    ap.add_argument("--gc", default="", help="every server process writes its garbage "
                    "collector's CPU time to this directory")
    ap.add_argument("--futures", type=int, default=0, help="instead: N unbatched submit() "
                    "futures at once, then wait for all (tasks/s and CPU per task), vs N "
                    "pipelined async raw RPyC pings")
    ap.add_argument("--no-ping", action="store_true", help="compute rounds only (profiling)")
    args = ap.parse_args()

    import rpycsvc
    from rpycsvc.cli.bench.tasks import noop
    from rpycsvc.client.local import read_address

    env = {k: v for k, v in os.environ.items() if not k.startswith("RPYCSVC_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "perfhook_site")] +
                                        [p for p in sys.path if p])
    env["RPYCSVC_PERFPROBE_NAMES"] = "1"
    if args.gc:
        Path(args.gc).mkdir(parents=True, exist_ok=True)
        env["RPYCSVC_PERFPROBE_GC"] = str(Path(args.gc).resolve())
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        env["RPYCSVC_PERFPROBE_PROFILE"] = str(Path(args.profile).resolve())
    proc = subprocess.Popen(
        [sys.executable, "-m", "rpycsvc.cli", "serve", "--port", "0", "-q", "--workers", "2",
         "--exit-on-stdin-eof"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        # (python -m puts its working directory first on sys.path: the server and its
        # workers must run the tree the client imported, not the one we are started in)
        cwd=str(Path(rpycsvc.__file__).resolve().parent.parent))
    try:
        address = read_address(proc, 60)
        c = rpycsvc.connect(address, timeout=30, output="discard")
        st = c.stats()
        workers = list(st["worker_pids"])
        spid = proc.pid
        ping = c.conn.root.ping

        def sync(i: int) -> Any:
            return c.compute(noop, i)

        for i in range(300):  # warm-up
            assert sync(i) == i
            ping(i)
        if args.futures:
            return futures(args, c, spid, workers, noop)
        results: dict[str, list[dict[str, float]]] = {"compute": [], "ping": []}
        tracers = []
        if args.strace:
            for who, pid in (("server", spid), ("worker", workers[0])):
                tracers.append(subprocess.Popen(
                    ["strace", "-c", "-f", "-p", str(pid), "-o", f"{args.strace}.{who}"],
                    stderr=subprocess.DEVNULL))
            time.sleep(1.0)  # (attaching: a research tool, not a test)
        by_thread: dict[str, float] = {}
        prof = None
        if args.profile:
            import cProfile
            prof = cProfile.Profile(time.thread_time)
        for _r in range(args.rounds):
            kinds = (("compute", sync),) if args.no_ping else (("compute", sync), ("ping", ping))
            for kind, fn in kinds:
                lat = []
                t0s = thread_cpu(spid)
                s0 = proc_cpu(spid)
                w0 = [proc_cpu(w) for w in workers]
                c0 = time.process_time()
                w_0 = time.perf_counter()
                if prof is not None and kind == "compute":
                    prof.enable()
                for i in range(args.calls):
                    a = time.perf_counter()
                    got = fn(i)
                    lat.append(time.perf_counter() - a)
                    if got != i:
                        raise SystemExit(f"{kind}({i}) returned {got!r}")
                if prof is not None and kind == "compute":
                    prof.disable()
                wall = time.perf_counter() - w_0
                c1 = time.process_time()
                s1 = proc_cpu(spid)
                t1s = thread_cpu(spid)
                w1 = [proc_cpu(w) for w in workers]
                n = args.calls
                results[kind].append({
                    "p50_us": statistics.median(lat) * 1e6,
                    "client_us": (c1 - c0) / n * 1e6,
                    "server_us": (s1 - s0) / n / 1e3,
                    "workers_us": (sum(w1) - sum(w0)) / n / 1e3,
                    "wall_us": wall / n * 1e6,
                })
                if kind == "compute":
                    for k, v in t1s.items():
                        name = k.split(":")[0]
                        by_thread[name] = by_thread.get(name, 0.0) + (v - t0s.get(k, 0)) / n / 1e3
        for t in tracers:
            t.send_signal(2)
            t.wait(30)
        if prof is not None:
            prof.dump_stats(str(Path(args.profile) / "client.prof"))
        c.close()
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    med = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]}
           for k, rs in results.items() if rs}
    print(f"{'':8} {'p50 us':>8} {'client':>8} {'server':>8} {'workers':>8} {'wall/call':>9}"
          "   (CPU us per call; median of rounds)")
    for k, m in med.items():
        print(f"{k:8} {m['p50_us']:8.1f} {m['client_us']:8.1f} {m['server_us']:8.1f} "
              f"{m['workers_us']:8.1f} {m['wall_us']:9.1f}")
    if "ping" in med:
        print(f"ratio compute/ping p50: {med['compute']['p50_us'] / med['ping']['p50_us']:.2f}x; "
              "per round: " + ", ".join(
                  f"{a['p50_us'] / b['p50_us']:.2f}" for a, b in zip(results['compute'],
                                                                 results['ping'])))
    if args.threads:
        r = args.rounds
        print("server CPU per compute call by thread (us):",
              ", ".join(f"{k} {v / r:.1f}" for k, v in sorted(by_thread.items(),
                                                              key=lambda kv: -kv[1]) if v > 0.5))
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": results, "median": med}, indent=1))
    return 0


def futures(args: Any, c: Any, spid: int, workers: list[int], noop: Any) -> int:
    """N unbatched futures vs N pipelined async RPyC pings, interleaved rounds."""
    import rpyc

    n = args.futures
    aping = rpyc.async_(c.conn.root.ping)
    rows: dict[str, list[tuple[float, float, float, float]]] = {"futures": [], "rpyc": []}
    for _r in range(args.rounds):
        for kind in ("futures", "rpyc"):
            s0, w0, c0 = proc_cpu(spid), sum(proc_cpu(w) for w in workers), time.process_time()
            t = time.perf_counter()
            if kind == "futures":
                fs = [c.submit(noop, i) for i in range(n)]
                ok = all(f.result() == i for i, f in enumerate(fs))
            else:
                rs = [aping(i) for i in range(n)]
                ok = all(r.value == i for i, r in enumerate(rs))
            dt = time.perf_counter() - t
            if not ok:
                raise SystemExit(f"{kind}: a wrong result")
            rows[kind].append((n / dt, (time.process_time() - c0) / n * 1e6,
                               (proc_cpu(spid) - s0) / n / 1e3,
                               (sum(proc_cpu(w) for w in workers) - w0) / n / 1e3))
    c.close()
    for kind, rs in rows.items():
        med = [statistics.median(r[i] for r in rs) for i in range(4)]
        print(f"{kind:8} {med[0]:9,.0f}/s  CPU per task: client {med[1]:6.1f} server "
              f"{med[2]:6.1f} workers {med[3]:6.1f} us   (median of {args.rounds})")
    print("ratio futures/rpyc: " + ", ".join(
        f"{a[0] / b[0]:.2f}" for a, b in zip(rows["futures"], rows["rpyc"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
