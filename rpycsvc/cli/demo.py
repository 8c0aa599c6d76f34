"""``rpycsvc demo``: start local servers, fan work out over them, print what happened.

The first of the README's two quick-start commands: it shows the server's compute endpoint
(``conn.root.compute``), futures, a load-balanced ``map`` and remote output, on servers
it starts on 127.0.0.1 and stops when done.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

from rpycsvc.client.output import write_stdout

# --help shows this as it is written: plain text, not the reST of the docstring above
DESCRIPTION = """\
Start local rpycsvc servers on 127.0.0.1, fan work out over them and print what happened:
the server's compute endpoint (conn.root.compute), a load-balanced map of CPU-bound
tasks, futures, and remote output. The servers stop when the demo ends."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--servers", type=int, default=2, metavar="N",
                   help="local servers to start (default: %(default)s)")
    p.add_argument("--tasks", type=int, default=16, metavar="N",
                   help="CPU-bound tasks to fan out (default: %(default)s)")


def say(*parts: object) -> None:
    """``print`` for the demo's own lines; ``rpycsvc demo | head`` then ends quietly."""
    write_stdout(" ".join(str(p) for p in parts) + "\n")


def collatz_steps(limit: int) -> tuple[int, int]:
    """The number below ``limit`` with the longest Collatz chain — honest CPU work."""
    best, best_n = 0, 1
    for n in range(1, limit):
        steps, x = 0, n
        while x != 1:
            x = x // 2 if x % 2 == 0 else 3 * x + 1
            steps += 1
        if steps > best:
            best, best_n = steps, n
    return best_n, best


def whoami(tag: str) -> str:
    import socket

    print(f"task {tag} running in process {os.getpid()}")
    return f"{tag}@{socket.gethostname()}:{os.getppid()}"


def run(args: argparse.Namespace) -> int:
    from rpycsvc.client.cluster import Cluster

    t0 = time.perf_counter()
    with Cluster.local(args.servers) as cluster:
        say(f"started {len(cluster)} local servers in {time.perf_counter() - t0:.2f} s: "
              f"{', '.join(cluster.addresses)}")
        # 1. conn.root.compute on each server, in parallel threads (one connection each)
        with ThreadPoolExecutor(len(cluster)) as pool:
            futs = [pool.submit(c.root.compute, whoami, f"hello-{i}")
                    for i, c in enumerate(cluster.clients)]
            for f in futs:
                say("conn.root.compute ->", f.result(timeout=60))
        # 2. a load-balanced fan-out of CPU-bound tasks
        limits = [30_000 + 2_000 * i for i in range(args.tasks)]
        t1 = time.perf_counter()
        results = list(cluster.map(collatz_steps, limits, timeout=300))
        took = time.perf_counter() - t1
        for limit, (n, steps) in zip(limits, results):
            say(f"  below {limit}: {n} takes {steps} steps")
        say(f"{args.tasks} tasks on {cluster.total_workers} workers in {took:.2f} s")
        # 3. futures, as_completed and a word count with map_reduce
        futs = [cluster.submit(pow, 3, k) for k in range(5)]
        say("3**k:", [f.result(timeout=60) for f in futs])
        import operator

        words = "the quick brown fox jumps over the lazy dog the end".split()
        counts = cluster.map_reduce(lambda w: [(w, 1)], operator.add, words, by_key=True)
        say("word counts:", dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))
    return 0
