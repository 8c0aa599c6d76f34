"""The tasks waiting for a worker, and which one goes next (the pool's queues).

Process-mode tasks wait in one queue per owner (a client connection) and are taken in
turns, so a client with a thousand queued tasks can't starve one with a single task.
Thread-mode tasks share one queue, first come first served (the thread worker runs many at
once). An owner can be *held*: its queued tasks wait, whichever mode, while the others' go
on — the server holds a connection whose client does not read its results, so the results
it can't send stop piling up in the server's memory (see
:class:`~rpycsvc.server.taskserver.TaskEndpoint`).

Not thread-safe on its own: :class:`~rpycsvc.server.pool.WorkerPool` calls it with its lock
held, and stays the one scheduler (this only orders what waits).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from rpycsvc.server.task import Task


class TaskQueues:
    """Queued tasks by owner, taken in turns; held owners' tasks wait."""

    def __init__(self) -> None:
        self._queues: dict[Hashable, deque[Task]] = {}  # process mode, per owner
        self._turns: deque[Hashable] = deque()  # owners with queued process tasks, in turn
        self._threads: deque[Task] = deque()  # thread mode, in order
        self._held: set[Hashable] = set()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values()) + len(self._threads)

    def put(self, task: Task) -> None:
        if task.mode == "thread":
            self._threads.append(task)
            return
        q = self._queues.get(task.owner)
        if q is None:
            q = self._queues[task.owner] = deque()
            self._turns.append(task.owner)
        q.append(task)

    def remove(self, task: Task) -> None:
        """Take ``task`` out if it is queued (a cancel); its owner keeps its turn."""
        q = self._queues.get(task.owner) if task.mode == "process" else self._threads
        if q is not None and task in q:
            q.remove(task)

    def next_process(self) -> Task | None:
        """The next process-mode task: the next owner's in turn that is not held."""
        for _ in range(len(self._turns)):
            owner = self._turns[0]
            self._turns.rotate(-1)
            if owner in self._held:
                continue
            q = self._queues.get(owner)
            task = q.popleft() if q else None
            if not q:  # emptied (maybe by cancel): this owner has no turn until it submits
                self._queues.pop(owner, None)
                self._turns.remove(owner)
            if task is not None:
                return task
        return None

    def has_thread_task(self) -> bool:
        """Whether a thread-mode task can go (one whose owner is not held)."""
        return any(t.owner not in self._held for t in self._threads) if self._held \
            else bool(self._threads)

    def thread_tasks(self) -> int:
        """How many thread-mode tasks wait (held ones included)."""
        return len(self._threads)

    def next_thread(self) -> Task | None:
        """The oldest thread-mode task whose owner is not held."""
        if not self._held:
            return self._threads.popleft() if self._threads else None
        for task in self._threads:
            if task.owner not in self._held:
                self._threads.remove(task)
                return task
        return None

    def hold(self, owner: Hashable) -> None:
        """Keep ``owner``'s tasks waiting until :meth:`release`."""
        self._held.add(owner)

    def release(self, owner: Hashable) -> None:
        self._held.discard(owner)

    @property
    def held(self) -> int:
        """How many owners are held."""
        return len(self._held)

    def take_all(self) -> list[Task]:
        """Every queued task, removed (a closing pool fails them); holds are forgotten."""
        tasks = [t for q in self._queues.values() for t in q] + list(self._threads)
        self._queues.clear()
        self._turns.clear()
        self._threads.clear()
        self._held.clear()
        return tasks
