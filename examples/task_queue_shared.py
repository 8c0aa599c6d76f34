"""Task master and workers (the ``multiprocessing.managers`` tutorial) with shared queues.

As in the tutorial, the queues live in one place and everybody talks to them: here they
are hosted by the first server (``rpycsvc.Queue(conn, "tasks")``). The master puts 10
random numbers on "tasks"; a worker loop runs on every server (a long-running task that
connects back to the queue-hosting server), gets numbers with a timeout, and puts
``(n, n*n)`` on "results"; the master gets the 10 results and prints them. Items travel by
value, so a worker that disconnects (the first one below takes one task and leaves)
doesn't affect the queue.

Run it on two local servers, or on servers already running (``rpycsvc serve``); the first
one hosts the queues and must be reachable from the others at the address given::

    python examples/task_queue_shared.py
    python examples/task_queue_shared.py host1:18812 host2:18812
"""

from __future__ import annotations

import random
import sys

import rpycsvc

#: Seconds a worker waits for a task before it gives up.
IDLE_TIMEOUT = 10.0


def worker(hub: str, limit: int = 1000) -> int:
    """The worker loop; runs on a server. Returns how many tasks it did."""
    import rpycsvc

    done = 0
    with rpycsvc.connect(hub, timeout=10) as conn:
        tasks, results = rpycsvc.Queue(conn, "tasks"), rpycsvc.Queue(conn, "results")
        while done < limit:
            try:
                n = tasks.get(timeout=IDLE_TIMEOUT)
            except TimeoutError:
                print("task queue is empty.")
                break
            if n is None:  # the master's "no more work"
                break
            print(f"run task {n} * {n}...")
            results.put((n, n * n), timeout=10)
            done += 1
    return done


def main(argv: list[str]) -> int:
    cluster = rpycsvc.Cluster(argv) if argv else rpycsvc.Cluster.local(2)
    with cluster:
        hub = cluster.addresses[0]
        tasks = rpycsvc.Queue(cluster[hub], "tasks")
        results = rpycsvc.Queue(cluster[hub], "results")
        print(f"master: queues 'tasks' and 'results' hosted by {hub}")
        for _ in range(10):
            n = random.randint(0, 10000)
            print(f"Put task {n}...")
            tasks.put(n, timeout=10)

        # A worker that does one task and disconnects: the queue keeps the rest.
        leaver = cluster[-1]
        took = leaver.submit(worker, hub, limit=1).result(timeout=60)
        print(f"a worker on {leaver.address} did {took} task and disconnected; "
              f"{tasks.qsize()} tasks still queued")

        loops = [client.submit(worker, hub) for client in cluster.clients]
        print("Try get results...")
        for _ in range(10):
            n, square = results.get(timeout=60)
            print(f"Result: {n} * {n} = {square}")
        for _ in loops:
            tasks.put(None, timeout=10)
        for client, loop in zip(cluster.clients, loops):
            print(f"worker on {client.address} did {loop.result(timeout=60)} tasks")
    print("master exit.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
