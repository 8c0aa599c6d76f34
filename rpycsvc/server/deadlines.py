"""The worker pool's task timeouts: the deadlines of running tasks, and the thread that keeps them.

Deadlines are kept in a heap, pruned of finished tasks in bulk; the loop of the deadline
thread stops each task whose deadline has passed.

The thread wakes at least every ``_TICK`` seconds while any deadline is pending; if it finds
much more time has passed than it slept (the server was stopped with SIGSTOP, or its VM
paused), it moves every pending deadline on by the gap: time the server was frozen is not a
task's running time.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("rpycsvc.pool")

#: While deadlines are pending, the deadline thread wakes at least this often (seconds)...
_TICK = 0.25
#: ...and a wake-up later than planned by more than this (seconds) means the server was
#: frozen (SIGSTOP, a paused VM) for that long: pending deadlines move on by as much. A
#: thread merely starved of CPU for that long makes timeouts as much more lenient.
_FROZEN_AFTER = 1.0
#: The deadline heap is rebuilt without finished tasks' entries once it holds more than this
#: many and more than twice as many as there are live tasks (so the cost is amortised).
_PRUNE_AT = 64


class Deadlines:
    """The deadlines of running tasks, as ``(time.monotonic() deadline, task id)`` in a heap,
    under the pool's lock: the ``*_locked`` methods are called with it held."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._heap: list[tuple[float, int]] = []
        self._cv = threading.Condition(lock)

    def __len__(self) -> int:
        """Timeouts being watched: running tasks' (and finished ones' not yet pruned;
        bounded by max(64, twice the live tasks))."""
        return len(self._heap)

    def add_locked(self, when: float, task_id: int) -> None:
        """Task ``task_id`` is to be stopped at ``when`` (``time.monotonic()``)."""
        heapq.heappush(self._heap, (when, task_id))
        self._cv.notify()

    def wake_locked(self) -> None:
        """Wake the deadline thread now (the pool is closing: it is to return)."""
        self._cv.notify_all()

    def prune_locked(self, running: Callable[[int], bool], live: int) -> None:
        """Drop finished tasks' deadline entries (``running(task_id)`` is False for them), in
        bulk once they outnumber the ``live`` tasks (an entry is otherwise kept until its
        time comes: a day's timeout on a busy server would be a day's worth of finished
        tasks)."""
        heap = self._heap
        if len(heap) > _PRUNE_AT and len(heap) > 2 * live:
            heap[:] = [e for e in heap if running(e[1])]
            heapq.heapify(heap)

    def run(self, closing: Callable[[], bool], due: Callable[[int], bool],
            expire: Callable[[int], object]) -> None:
        """The deadline thread, until ``closing()``: each task whose deadline passed and that
        is still ``due(task_id)`` (both asked with the lock held) is stopped by
        ``expire(task_id)``, called without the lock."""
        planned: float | None = None  # when the last wait was to end (None: no bound)
        with self._lock:
            while not closing():
                if planned is not None:
                    late = time.monotonic() - planned
                    if late > _FROZEN_AFTER:
                        self._shift_locked(late)
                    planned = None
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    _, task_id = heapq.heappop(self._heap)
                    if due(task_id):
                        self._lock.release()
                        try:
                            expire(task_id)
                        finally:
                            self._lock.acquire()
                    continue
                wait = min(self._heap[0][0] - now, _TICK) if self._heap else None
                if wait is not None:
                    planned = now + wait
                self._cv.wait(wait)

    def _shift_locked(self, gap: float) -> None:
        """The server was frozen for about ``gap`` seconds: its tasks did not run meanwhile
        (a stop of the whole process tree, a paused VM), so none of it counts against
        their timeouts."""
        log.warning("the server was frozen (stopped or paused) for %.1f s; the running tasks' "
                    "timeouts are extended by as much", gap)
        self._heap[:] = [(when + gap, task_id) for when, task_id in self._heap]
        heapq.heapify(self._heap)
