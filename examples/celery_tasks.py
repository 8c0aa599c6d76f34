"""Celery-style tasks: ``@cluster.task``, ``.delay``, ``.apply_async``, ids and timeouts.

Celery's first steps (``@app.task def add(x, y)``, ``add.delay(4, 4)``,
``result.get(timeout=1)``) without a broker or a result backend: the decorated function
is sent by value to the least busy server and the returned future (a
``concurrent.futures.Future`` with Celery's ``.id``) gets the result straight back.
``apply_async(args, kwargs, timeout=...)`` sets a time limit the server enforces, like
Celery's ``time_limit``; calling the task directly still runs it here.

Run it on two local servers, or on servers already running (``rpycsvc serve``)::

    python examples/celery_tasks.py
    python examples/celery_tasks.py host1:18812 host2:18812
"""

from __future__ import annotations

import sys
import time

import rpycsvc


def main(argv: list[str]) -> int:
    cluster = rpycsvc.Cluster(argv) if argv else rpycsvc.Cluster.local(2)
    with cluster:

        @cluster.task
        def add(x: int, y: int) -> int:
            return x + y

        @cluster.task(timeout=1.0)  # at most 1 s on the server unless apply_async says otherwise
        def nap(seconds: float) -> float:
            time.sleep(seconds)
            return seconds

        result = add.delay(5, 7)
        print(f"add.delay(5, 7) -> task id {result.id}")
        print(f"add.delay(5, 7).result(timeout=10) = {result.result(timeout=10)}")
        print(f"ready: {result.done()}")  # Celery's result.ready()

        result = add.apply_async((2, 3), timeout=5)
        print(f"add.apply_async((2, 3), timeout=5) = {result.result(timeout=10)} "
              f"(task id {result.id})")
        print(f"add(1, 1) = {add(1, 1)} (called directly: runs here, not on a server)")

        print(f"nap.delay(0.1) = {nap.delay(0.1).result(timeout=10)}")
        try:
            nap.delay(30).result(timeout=20)
        except rpycsvc.TaskTimeoutError as exc:
            print(f"nap.delay(30) stopped by its time limit: {type(exc).__name__}: {exc}")
        print(f"nap.apply_async((1.5,), timeout=5) = "
              f"{nap.apply_async((1.5,), timeout=5).result(timeout=10)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
