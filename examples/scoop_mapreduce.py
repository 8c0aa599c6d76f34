"""SCOOP's ``mapReduce`` example with ``Cluster.map_reduce``, against a serial run.

``simulateWorkload`` sleeps 10 ms and sums a list, standing in for real work. SCOOP's
``futures.mapReduce(simulateWorkload, operator.add, data)`` becomes
``cluster.map_reduce(simulateWorkload, operator.add, data)``: every server maps and
reduces its own share and only the partial sums travel back. Both times are printed;
how much faster the cluster is depends on how many workers it has.

Run it on two local servers, or on servers already running (``rpycsvc serve``)::

    python examples/scoop_mapreduce.py
    python examples/scoop_mapreduce.py host1:18812 host2:18812
"""

from __future__ import annotations

import operator
import sys
import time

import rpycsvc

ITEMS = 200  # 200 * 10 ms = 2 s of serial work


def simulateWorkload(inData: list[int]) -> int:  # SCOOP's name, kept for comparison
    time.sleep(0.01)
    return sum(inData)


def main(argv: list[str]) -> int:
    data = [[a] * a for a in range(ITEMS)]
    cluster = rpycsvc.Cluster(argv) if argv else rpycsvc.Cluster.local(2)
    with cluster:
        start = time.perf_counter()
        result = cluster.map_reduce(simulateWorkload, operator.add, data, timeout=120)
        took = time.perf_counter() - start
        print(f"Executed in parallel on {cluster.total_workers} workers in {took:.3f} s "
              f"with result: {result}")

    start = time.perf_counter()
    serial = sum(map(simulateWorkload, data))
    took = time.perf_counter() - start
    print(f"Executed serially in {took:.3f} s with result: {serial}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
