"""The cluster's bookkeeping: a job (one task or map chunk), the queue of jobs waiting for
a slot, and one server's state (its connection, what it has in flight, its capacity)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from rpycsvc.client.connection import Client
from rpycsvc.client.future import TaskFuture
from rpycsvc.errors import ServerLostError

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
    future: TaskFuture
    retries: int
    pinned: str | None = None  # broadcast: this server only
    attempts: int = 0
    server: _Server | None = None
    client: Client | None = None  # the connection of the current attempt (keys are per client)
    key: int = 0  # the task's key on that client; 0 until sent
    size: int = 1  # items in a map chunk
    sent: float = 0.0
    #: its future left PENDING (set_running_or_notify_cancel called); under the cluster lock
    started: bool = False
    #: stop() was asked while it was being sent (no key yet): stopped once it has one
    stop_asked: bool = False
    errors: list[str] = field(default_factory=list)  # "address: cause" per lost attempt
    #: a map chunk's sizer: told ``(items, seconds, result bytes)`` when an attempt
    #: finishes, in the reader thread, with the worker's service time (or the round trip
    #: if the server did not say); it holds no reference to the job, so results are not
    #: kept alive
    observe: Callable[[int, float, int], None] | None = None


class _JobQueue:
    """Jobs waiting for a slot, one FIFO per (mode, pinned server): when every server is full
    for a kind of job, only the head of that kind is looked at, not each queued job."""

    def __init__(self) -> None:
        self._fifos: dict[tuple[str, str | None], deque[_Job]] = {}
        self._n = 0  # jobs in all fifos: an empty queue is known without looking at them

    @staticmethod
    def _kind(job: _Job) -> tuple[str, str | None]:
        return job.opts.get("mode", "process"), job.pinned

    def append(self, job: _Job, *, front: bool = False) -> bool:
        """Queue ``job``; True if it is the head of its kind now (only then can a dispatch
        send it before the jobs queued already)."""
        fifo = self._fifos.setdefault(self._kind(job), deque())
        fifo.appendleft(job) if front else fifo.append(job)
        self._n += 1
        return front or len(fifo) == 1

    def remove(self, job: _Job) -> bool:
        fifo = self._fifos.get(self._kind(job))
        if fifo is None or job not in fifo:
            return False
        fifo.remove(job)
        self._n -= 1
        return True

    def heads(self) -> list[_Job]:
        return [fifo[0] for fifo in self._fifos.values() if fifo]

    def take_pinned(self, keep: Callable[[str], bool]) -> list[_Job]:
        """Remove and return the jobs pinned to a server ``keep(address)`` says no to."""
        out: list[_Job] = []
        for kind in [k for k in self._fifos if k[1] is not None and not keep(k[1])]:
            out.extend(self._fifos.pop(kind))
        self._n -= len(out)
        return out

    def popleft(self, job: _Job) -> None:
        self._fifos[self._kind(job)].popleft()
        self._n -= 1

    def clear(self) -> list[_Job]:
        jobs = [j for fifo in self._fifos.values() for j in fifo]
        self._fifos.clear()
        self._n = 0
        return jobs

    def __len__(self) -> int:
        return self._n


class _Server:
    """One server as the cluster sees it. ``error`` is why it is down (kept per server, so
    :class:`AllServersFailedError` can name each one's cause); ``draining`` is set when it
    refused a task because it is shutting down: it gets no new tasks until reconnected."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.client: Client | None = None
        self.inflight: set[_Job] = set()
        self.threaded = 0  # of which thread-mode
        self.error: BaseException | None = None
        self.draining: BaseException | None = None
        self.reconnecting = False
        #: jobs it takes at once per mode (process: workers x PIPELINE; thread: its threads),
        #: read once per connection rather than per job
        self.capacity = {"process": 0, "thread": 0}

    def attach(self, client: Client) -> None:
        """Use ``client`` from now on (a first connection or a reconnection)."""
        self.client, self.error, self.draining = client, None, None
        self.capacity = {"process": client.workers * PIPELINE, "thread": client.threads}

    def cause(self) -> BaseException | str:
        """Why this server takes no tasks now, for error messages."""
        if self.error is not None:
            return self.error
        lost = self.client.lost if self.client is not None else None
        if lost is not None:  # lost, and the cluster's on_lost has not run yet
            if isinstance(lost, ServerLostError):
                return lost
            return ServerLostError(f"lost the connection to {self.address} "
                                   f"({type(lost).__name__}: {lost})", address=self.address)
        if self.draining is not None:
            return self.draining
        return "closed" if self.client is not None else "down"

    def load(self, mode: str) -> float:
        """Fraction of this server's capacity for ``mode`` in use (1.0: full, down or
        draining, so a server with a load under 1.0 takes the job)."""
        client = self.client
        if client is None or client.closed or self.draining is not None:
            return 1.0
        cap = self.capacity.get(mode, 0)
        if cap <= 0:
            return 1.0
        used = self.threaded if mode == "thread" else len(self.inflight) - self.threaded
        return used / cap

    @property
    def up(self) -> bool:
        """Connected (classic access works), draining or not."""
        return self.client is not None and not self.client.closed

    @property
    def usable(self) -> bool:
        """Connected and taking new tasks."""
        return self.draining is None and self.up
