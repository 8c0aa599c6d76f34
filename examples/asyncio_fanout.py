"""Fan work out to rpycsvc servers from asyncio code: await tasks, stream a map, time out.

``AsyncCluster`` is the cluster API, awaited: ``await cluster.submit(...)`` gives a
task's result, ``async for`` streams a map's results as they come, and cancelling what
awaits a task (here ``asyncio.wait_for``'s deadline) stops the task on its server. The
event loop never waits for the network, so other coroutines (the ticker below) keep
running throughout.

Run it on two local servers, or on servers already running (``rpycsvc serve``)::

    python examples/asyncio_fanout.py
    python examples/asyncio_fanout.py host1:18812 host2:18812
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import rpycsvc


def collatz_steps(n: int) -> int:
    """How many Collatz steps take ``n`` to 1 (a small CPU-bound task)."""
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps


def slow(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


async def ticker(ticks: list[int]) -> None:
    """Another coroutine on the same loop: it keeps running while tasks are awaited."""
    while True:
        await asyncio.sleep(0.01)
        ticks.append(1)


async def main(argv: list[str]) -> None:
    cluster = rpycsvc.AsyncCluster(argv) if argv else rpycsvc.AsyncCluster.local(2)
    ticks: list[int] = []
    tick = asyncio.ensure_future(ticker(ticks))
    async with cluster:
        print(f"servers: {len(cluster)}, workers: {cluster.total_workers}")
        print("collatz_steps(27) =", await cluster.submit(collatz_steps, 27))

        # many tasks at once: gather awaits them all
        steps = await asyncio.gather(*(cluster.submit(collatz_steps, n) for n in range(1, 101)))
        print("longest below 100:", max(range(1, 100), key=lambda n: steps[n - 1]))

        # a streaming map: results in input order, as their (automatic) chunks finish
        best = (0, 0)
        async for n, s in _numbered(cluster.map(collatz_steps, range(1, 100_001)), start=1):
            best = max(best, (s, n))
        print(f"longest below 100,000: {best[1]} ({best[0]} steps)")

        total = await cluster.map_reduce(collatz_steps, lambda a, b: a + b, range(1, 1001))
        print("steps summed over 1..1000:", total)

        # a deadline: the awaiting is cancelled, and so is the task on its server
        try:
            await asyncio.wait_for(cluster.submit(slow, 60), timeout=0.5)
        except asyncio.TimeoutError:
            print("slow(60) timed out after 0.5 s; it was stopped on its server")

        for client in cluster.clients:
            stats = await client.stats()  # an RPyC call, made off the event loop
            print(f"  {client.address}: {stats['tasks_done']} tasks done")
    tick.cancel()
    print(f"the ticker ran {'on' if len(ticks) > 10 else 'NOT'} while we awaited")


async def _numbered(results, start: int = 0):  # type: ignore[no-untyped-def]
    n = start
    async for r in results:
        yield n, r
        n += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
