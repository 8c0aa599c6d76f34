"""Task master and workers (the ``multiprocessing.managers`` tutorial) with ``Cluster.map``.

The tutorial's master puts 10 random numbers in a task queue, workers on other machines
compute n*n and put the results in a result queue, and the master prints them. With
rpycsvc the queues are the cluster's job: ``cluster.map`` sends each number to a free
worker and hands the squares back in input order. The workers' ``print`` arrives here,
prefixed with the server it ran on.

Run it on two local servers, or on servers already running (``rpycsvc serve``)::

    python examples/task_queue_map.py
    python examples/task_queue_map.py host1:18812 host2:18812

``task_queue_shared.py`` is the same program with real shared queues hosted by a server.
"""

from __future__ import annotations

import random
import sys

import rpycsvc


def square(n: int) -> int:
    """The worker's job; runs on a server (sent there by value)."""
    print(f"run task {n} * {n}...")
    return n * n


def main(argv: list[str]) -> int:
    cluster = rpycsvc.Cluster(argv) if argv else rpycsvc.Cluster.local(2)
    with cluster:
        print(f"master: {len(cluster)} servers, {cluster.total_workers} workers")
        numbers = [random.randint(0, 10000) for _ in range(10)]
        for n in numbers:
            print(f"Put task {n}...")
        print("Try get results...")
        # timeout bounds the whole wait; a worker's exception would re-raise here
        for n, result in zip(numbers, cluster.map(square, numbers, timeout=60)):
            print(f"Result: {n} * {n} = {result}")
    print("master exit.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
