"""SCOOP's Monte Carlo π with ``Cluster.map`` over the workers.

SCOOP's example throws darts at the unit square in many small tasks with
``futures.map(test, [tries] * n)`` and counts the hits inside the quarter circle. The
rpycsvc version is the same two lines; ``map`` is lazy, keeps a few tasks per worker in
flight and batches small ones, and returns the counts in input order.

Run it on two local servers, or on servers already running (``rpycsvc serve``)::

    python examples/scoop_pi.py
    python examples/scoop_pi.py host1:18812 host2:18812
"""

from __future__ import annotations

import sys
import time
from math import hypot
from random import random

import rpycsvc

TASKS = 200
TRIES = 5000  # darts per task: 1,000,000 in all


def test(tries: int) -> int:
    """Darts, out of ``tries``, that land inside the quarter circle (runs on a server)."""
    return sum(hypot(random(), random()) < 1 for _ in range(tries))


def calc_pi(cluster: rpycsvc.Cluster, tasks: int, tries: int) -> float:
    hits = cluster.map(test, [tries] * tasks, timeout=120)
    return 4.0 * sum(hits) / (tasks * tries)


def main(argv: list[str]) -> int:
    cluster = rpycsvc.Cluster(argv) if argv else rpycsvc.Cluster.local(2)
    with cluster:
        start = time.perf_counter()
        pi = calc_pi(cluster, TASKS, TRIES)
        took = time.perf_counter() - start
        print(f"{TASKS * TRIES} darts in {TASKS} tasks on {cluster.total_workers} workers "
              f"in {took:.2f} s")
        print(f"pi = {pi:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
