"""The cluster's bookkeeping: a job (one task or map chunk), the queue of jobs waiting for
a slot, and one server's state (its connection, what it has in flight, its capacity)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .client import Client

#: Jobs in flight per worker of a server: enough to hide the round trip, small enough that
#: a dead server's share is small and a slow server is not handed a long backlog.
PIPELINE = 2
#: How often a task is re-run after its server died, unless told otherwise.
DEFAULT_RETRIES = 3


@dataclass(eq=False)
class _Job:
    kind: str
    spec: Any
    frames: tuple[bytes, ...]
    opts: dict[str, Any]
    future: Future
    retries: int
    pinned: str | None = None  # broadcast: this server only
    attempts: int = 0
    server: _Server | None = None
    key: int = 0
    size: int = 1  # items in a map chunk
    sent: float = 0.0
    errors: list[str] = field(default_factory=list)


class _JobQueue:
    """Jobs waiting for a slot, one FIFO per (mode, pinned server): when every server is full
    for a kind of job, only the head of that kind is looked at, not each queued job."""

    def __init__(self) -> None:
        self._fifos: dict[tuple[str, str | None], deque[_Job]] = {}

    @staticmethod
    def _kind(job: _Job) -> tuple[str, str | None]:
        return job.opts.get("mode", "process"), job.pinned

    def append(self, job: _Job, *, front: bool = False) -> None:
        fifo = self._fifos.setdefault(self._kind(job), deque())
        fifo.appendleft(job) if front else fifo.append(job)

    def remove(self, job: _Job) -> bool:
        fifo = self._fifos.get(self._kind(job))
        if fifo is None or job not in fifo:
            return False
        fifo.remove(job)
        return True

    def heads(self) -> list[_Job]:
        return [fifo[0] for fifo in self._fifos.values() if fifo]

    def popleft(self, job: _Job) -> None:
        self._fifos[self._kind(job)].popleft()

    def clear(self) -> list[_Job]:
        jobs = [j for fifo in self._fifos.values() for j in fifo]
        self._fifos.clear()
        return jobs

    def __bool__(self) -> bool:
        return any(self._fifos.values())


class _Server:
    def __init__(self, address: str) -> None:
        self.address = address
        self.client: Client | None = None
        self.inflight: set[_Job] = set()
        self.threaded = 0  # of which thread-mode
        self.error: BaseException | None = None
        self.reconnecting = False

    def load(self, mode: str) -> float:
        """Fraction of this server's capacity for ``mode`` in use (1.0: full or down)."""
        if self.client is None:
            return 1.0
        if mode == "thread":
            cap, used = self.client.threads, self.threaded
        else:
            cap, used = self.client.workers * PIPELINE, len(self.inflight) - self.threaded
        return used / cap if cap > 0 else 1.0

    @property
    def up(self) -> bool:
        return self.client is not None and not self.client.closed
