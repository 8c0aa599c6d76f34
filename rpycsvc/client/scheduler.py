"""A cluster's scheduler: its servers, its queue of jobs, and what happens to a job.

A :class:`Scheduler` keeps one :class:`~rpycsvc.client.jobs._Server` per server (its
connection, what it has in flight) and a local queue of jobs. A job goes to the server with
the most free capacity (its worker count times a small pipelining factor), so bigger
servers get more work and a slow one gets less; among equally loaded servers the pick
takes turns, so work spreads over all of them. A job goes straight to a server when nothing
waits in the queue; the queue holds only what no server has room for.

What is re-run, and what is not:

- a connection dies (the server crashed, was killed, froze past ``lost_after``, or cut off
  a running task at the end of its shutdown grace): its jobs go back to the queue up to
  ``retries`` times (at-least-once: a frozen server's workers may still finish them; with
  ``retries=0``, at-most-once) and the server is reconnected in the background (by the
  :class:`~rpycsvc.client.cluster.Cluster`, which owns the connections);
- a server shutting down refuses a task, or drops it before it started
  (:class:`ServerDrainingError`): the task never ran, so it goes to another server
  whatever ``retries`` says, and that server gets no new tasks until it is reconnected;
- nothing else is re-run: a task that raised, timed out or was too large fails as it is,
  and :meth:`Scheduler.close` (``Cluster.close``) cancels what is in flight instead of
  sending it elsewhere.

If no server is left, every waiting job fails at once with :class:`AllServersFailedError`
naming each server and its own cause.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from rpycsvc.client.calls import decode_reply, frames_of_call
from rpycsvc.client.connection import Client
from rpycsvc.client.environment import misfits
from rpycsvc.client.future import TaskFuture, settle
from rpycsvc.client.jobs import _Job, _JobQueue, _Server
from rpycsvc.errors import (
    AllServersFailedError,
    RemoteTaskError,
    RpycsvcError,
    ServerDrainingError,
    ServerLostError,
    TaskCancelledError,
)

log = logging.getLogger("rpycsvc.cluster")

#: What a failed task's error means for the cluster (see :func:`_fate_of`).
_DRAINING, _LOST = "draining", "lost"


def _fate_of(exc: BaseException) -> str | None:
    """``"draining"``: the server refused the task or dropped it unstarted because it is
    shutting down (the task never ran); ``"lost"``: the server cut the running task off as
    it shut down; ``None``: the task's own outcome, which is never re-run."""
    if isinstance(exc, ServerDrainingError):
        return _DRAINING
    if isinstance(exc, ServerLostError):
        return _LOST
    if isinstance(exc, RemoteTaskError):  # a reply whose error type the client can't rebuild
        return {"ServerDrainingError": _DRAINING, "ServerLostError": _LOST}.get(exc.remote_type)
    return None


def _draining_error(exc: BaseException, address: str) -> ServerDrainingError:
    """``exc`` (a draining refusal) as a :class:`ServerDrainingError`."""
    if isinstance(exc, ServerDrainingError):
        return exc
    text = str(exc.args[0]) if exc.args else str(exc)  # (a RemoteTaskError's own text)
    return ServerDrainingError(f"{text} (on {address})", address=address)


class Scheduler:
    """A cluster's servers and queue of jobs: which server takes a job, sending it, settling
    its future, and sending it elsewhere when its server is lost or draining (see the
    module's text). One lock guards the servers' books and the queue; jobs are sent, and
    futures settled, outside it. The cluster that owns it makes and closes the connections.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[str, _Server] = {}
        #: the servers in a list, for the rotating pick (see _pick_locked), and where the
        #: next pick starts looking
        self._ring: list[_Server] = []
        self._next = 0
        #: some connected server can't rebuild code sent by value (rpycsvc.client.environment):
        #: only then does a pick look at each task's code
        self._mixed = False
        self._queue = _JobQueue()
        self._closed = False

    # -- the servers ---------------------------------------------------------------------------
    @property
    def servers(self) -> Mapping[str, _Server]:
        """Every server known, by address, up or down (a read-only view)."""
        return MappingProxyType(self._servers)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def clients(self) -> list[Client]:
        """The connections that are up now."""
        return [s.client for s in self._servers.values() if s.up]  # type: ignore[misc]

    @property
    def total_workers(self) -> int:
        """Process workers over every server that takes tasks."""
        return sum(s.client.workers for s in self._servers.values() if s.client and s.usable)

    @property
    def total_threads(self) -> int:
        """Thread-mode slots over every server that takes tasks."""
        return sum(s.client.threads for s in self._servers.values() if s.client and s.usable)

    def usable_addresses(self) -> list[str]:
        """The servers that take new tasks now."""
        with self._lock:
            return [a for a, s in self._servers.items() if s.usable]

    def attach(self, srv: _Server, client: Client) -> None:
        """``srv`` uses ``client`` from now on (its first connection)."""
        with self._lock:
            self._attach_locked(srv, client)

    def add(self, client: Client) -> None:
        """Use ``client``, for a known server (a reconnection) or a new one."""
        with self._lock:
            srv = self._servers.get(client.address) or _Server(client.address)
            self._attach_locked(srv, client)

    def reattach(self, srv: _Server, client: Client) -> bool:
        """``srv`` was reconnected: use ``client``; False (and nothing done) if closed."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._attach_locked(srv, client)
        return not closed

    def _attach_locked(self, srv: _Server, client: Client) -> None:
        """``srv`` uses ``client`` from now on (first connection or reconnection)."""
        srv.attach(client)
        if self._servers.get(srv.address) is not srv:
            self._servers[srv.address] = srv
            self._ring = list(self._servers.values())
        if client.environment.conflict is not None:
            self._mixed = True  # (never reset: misfits() itself is exact, only slower)

    def lost(self, client: Client, exc: BaseException,
             reconnect: bool) -> tuple[_Server | None, bool]:
        """``client``'s connection died: its server is down (its jobs come back through
        their own ``"lost"`` replies). Returns the server and whether to start reconnecting
        it (``reconnect``, unless closed or one runs already); ``(None, False)`` if
        ``client`` is not the current connection of a server of ours."""
        with self._lock:
            srv = self._servers.get(client.address)
            if srv is None or srv.client is not client:
                return None, False
            srv.client, srv.error = None, exc  # (draining stays until reconnected)
            start = reconnect and not self._closed and not srv.reconnecting
            srv.reconnecting = srv.reconnecting or start
        return srv, start

    def close(self) -> list[Client] | None:
        """Cancel every job not finished yet: queued and running ones fail with
        :class:`TaskCancelledError` and nothing is sent anywhere any more. Returns the
        connections, for the caller to close; None if it was closed already."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            queued = self._queue.clear()
            running = [(s.address, j) for s in self._servers.values() for j in s.inflight]
            clients = [s.client for s in self._servers.values() if s.client is not None]
        for job in queued:
            self._fail_unsent(job, TaskCancelledError(
                "the cluster was closed before the task was sent to a server"))
        for address, job in running:
            self._cancel_closed(job, address)
        return clients

    # -- jobs ----------------------------------------------------------------------------------
    def submit(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               opts: dict[str, Any], retries: int, pinned: str | None = None) -> TaskFuture:
        """``fn(*args, **kwargs)`` as a job, sent now or queued: its future at once
        (``pinned``: to that server only, as ``broadcast`` sends)."""
        kind, spec, frames = frames_of_call(fn, args, kwargs)
        label = spec if spec else getattr(fn, "__qualname__", "task")
        fut = TaskFuture()
        job = _Job(kind, spec, frames, {**opts, "label": label}, fut, retries, pinned)
        fut._stopper = functools.partial(self.stop_job, job)
        self.enqueue([job])
        return fut

    def enqueue(self, jobs: list[_Job]) -> None:
        """Queue ``jobs``, or send one at once: when nothing waits in the queue and a server
        has a free slot, a job goes straight to it (one lock, no queue round trip)."""
        client: Client | None = None
        heads = False  # a job queued at the head of its kind: a dispatch may send it now
        with self._lock:
            if self._closed:
                raise RpycsvcError("this cluster is closed")
            if len(jobs) == 1 and not self._queue:
                job = jobs[0]
                srv = self._pick_locked(job)
                if srv is None:
                    heads = self._queue.append(job)
                elif self._start_locked(job):
                    client = self._book_locked(job, srv)
                # else: cancelled before it was sent: dropped (its waiters were told)
            else:
                for job in jobs:
                    heads = self._queue.append(job) or heads
        # (A job queued behind others of its kind is sent by the dispatch that sends
        # them: every dispatch leaves the queue with nothing that fits a server.)
        if client is not None:
            self._send(jobs[0], client)
        elif heads:
            self.dispatch()

    def stop_job(self, job: _Job) -> None:
        """The job's future was cancelled or stopped: drop it from the queue, or stop it on
        its server (if it is being sent right now, :meth:`_send` stops it once it has
        its key). Whoever takes a job out of the queue tells the future's waiters
        (``wait``, ``as_completed``) that a cancelled one is done."""
        with self._lock:
            removed = self._queue.remove(job)
            if removed:
                self._start_locked(job)
            client, key = job.client, job.key
            if not key:
                job.stop_asked = True
        if removed:  # the job behind it may fit where it did not (code sent by value)
            self.dispatch()
            return
        if client is not None and key:
            client.cancel_task(key)

    @staticmethod
    def _start_locked(job: _Job) -> bool:
        """The job leaves the queue: its future leaves PENDING (once). False if it was
        cancelled: it must not be sent (its waiters are told it is done)."""
        if job.started:
            return not job.future.done()
        job.started = True
        try:
            return job.future.set_running_or_notify_cancel()
        except RuntimeError:  # settled already (it can't be: to be safe, don't send it)
            return False

    def _fail_unsent(self, job: _Job, exc: BaseException) -> None:
        """Fail a job taken out of the queue without sending it (closed, no server)."""
        with self._lock:
            send = self._start_locked(job)
        if send:
            settle(job.future, None, exc)

    def _pick_locked(self, job: _Job) -> _Server | None:
        """The server for ``job``: the least loaded one with a free slot for its mode.

        Among equally loaded servers the pick rotates (it starts looking after the server
        picked last), so work spreads over every server instead of filling the first ones
        while the rest idle; the first idle server found is taken at once."""
        mode = job.opts.get("mode", "process")
        if job.pinned:  # broadcast: that server only
            pinned = self._servers.get(job.pinned)
            return pinned if pinned is not None and pinned.load(mode) < 1.0 else None
        # Code sent by value goes only to servers that can rebuild it, when some can
        # (mixed Python versions; rpycsvc.client.environment). Elsewhere it fails before it is
        # sent, with EnvironmentMismatchError, and is not re-run.
        skip = misfits(job.kind, job.frames, self._ring) if self._mixed else ()
        ring = self._ring
        n = len(ring)
        start = self._next if self._next < n else 0
        best, best_load, best_at = None, 1.0, 0
        for i in range(start, start + n):
            at = i - n if i >= n else i
            srv = ring[at]
            load = srv.load(mode)
            if load < best_load and srv not in skip:
                best, best_load, best_at = srv, load, at
                if load == 0.0:
                    break
        if best is not None:
            self._next = best_at + 1
        return best

    def _book_locked(self, job: _Job, srv: _Server) -> Client:
        """``job`` (out of the queue, started) is sent to ``srv`` now: count it there."""
        client = srv.client
        assert client is not None
        job.server, job.client, job.key = srv, client, 0
        job.attempts += 1
        job.sent = time.monotonic()
        srv.inflight.add(job)
        if job.opts.get("mode") == "thread":
            srv.threaded += 1
        job.future.address = srv.address
        return client

    def _send(self, job: _Job, client: Client) -> None:
        """Send ``job`` (booked on ``client``'s server) outside the lock."""
        try:
            key = client.start_task(job.kind, job.spec, job.opts, job.frames,
                                    functools.partial(self._on_done, job), job.future)
        except ServerLostError as exc:
            self._on_done(job, "lost", exc)
            return
        except Exception as exc:  # refused before sending (e.g. too large): this task only
            self._forget(job)
            settle(job.future, None, exc)
            return
        with self._lock:
            job.key = key
            stop = job.stop_asked
        if stop:  # stopped while we sent it: stop_job had no key
            client.cancel_task(key)

    def dispatch(self) -> None:
        """Send queued jobs to servers with free slots; fail them all if none is left.

        Everything that can go now is taken out of the queue in one hold of the lock and
        sent after it; broadcast jobs whose server went down or is draining fail with its
        cause."""
        batch: list[tuple[_Job, Client]] = []
        stranded: list[tuple[_Job, BaseException]] = []
        doomed: list[_Job] = []
        causes: dict[str, BaseException | str] = {}
        with self._lock:
            while self._queue:
                for job in self._queue.heads():
                    srv = self._pick_locked(job)
                    if srv is not None:
                        break
                else:
                    break  # no queued job fits anywhere now
                self._queue.popleft(job)
                if self._start_locked(job):  # (else cancelled while queued: dropped)
                    batch.append((job, self._book_locked(job, srv)))
            if self._queue:
                if not any(s.usable for s in self._ring):
                    doomed = self._queue.clear()
                    causes = {a: s.cause() for a, s in self._servers.items()}
                else:
                    stranded = [(j, self._pinned_cause_locked(j))
                                for j in self._queue.take_pinned(
                                    lambda a: a in self._servers and self._servers[a].usable)]
        for job, client in batch:
            self._send(job, client)
        for job, cause in stranded:  # (outside the lock: callbacks may call us)
            self._fail_unsent(job, cause)
        if doomed:
            err = AllServersFailedError("every server of the cluster is down", causes)
            for job in doomed:
                self._fail_unsent(job, err)

    def _pinned_cause_locked(self, job: _Job) -> BaseException:
        srv = self._servers.get(job.pinned or "")
        cause = srv.cause() if srv is not None else "not in this cluster"
        if isinstance(cause, BaseException):
            return cause
        return ServerLostError(f"{job.pinned} is {cause}", address=job.pinned)

    def _forget(self, job: _Job) -> bool:
        """The job's attempt is over: free its slot. True if jobs wait in the queue (then
        whoever freed the slot dispatches; a job queued later is dispatched by its sender)."""
        srv = job.server
        with self._lock:
            if srv is not None and job in srv.inflight:
                srv.inflight.discard(job)
                if job.opts.get("mode") == "thread":
                    srv.threaded -= 1
            return bool(self._queue)

    def _on_done(self, job: _Job, status: str, value: Any) -> None:
        """A job's attempt ended (in the client's reader thread): settle its future, or
        send it elsewhere if its server was lost (per ``retries``) or is draining."""
        srv = job.server
        address = srv.address if srv else "?"
        waiting = self._forget(job)
        if status == "lost":
            err: BaseException = value
            fate: str | None = _LOST
        else:
            if job.observe is not None and value[0] in ("ok", "raised"):
                # the worker's own time on the chunk, not its wait in any queue; the
                # round trip only if the server did not say
                service = value[2] if len(value) > 2 else None
                nbytes = sum(memoryview(f).nbytes for f in value[1]) if value[0] == "ok" else 0
                job.observe(job.size, time.monotonic() - job.sent if service is None
                            else service, nbytes)
            try:
                ok, result = decode_reply(value, address)
            except RpycsvcError as exc:
                ok, result = False, exc
            # Only the server's own refusals ("error" replies) say something about the
            # server; an exception the task raised ("raised"), even a ServerLostError of
            # another connection it used, is the task's outcome and is never re-run.
            server_said = not ok and value[0] == "error"
            fate = _fate_of(result) if server_said else None
            if fate is None:
                settle(job.future, result if ok else None, None if ok else result)
                if waiting:
                    self.dispatch()
                return
            err = result
        if status != "lost" and srv is not None:
            # The server itself refused the task or cut it off, as it shuts down: it is
            # draining (its connection is still up), so nothing more goes there.
            self._drained(srv, err)
        if self._closed:  # closing cancels: what was in flight is not sent anywhere else
            self._cancel_closed(job, address)
            return
        if job.future.done():  # cancelled meanwhile: nothing to re-run; its slot is free
            self.dispatch()
            return
        job.errors.append(f"{address}: {err}")
        if fate == _DRAINING and job.pinned:  # broadcast: meant for that server only
            settle(job.future, None, _draining_error(err, address))
        elif fate == _DRAINING:
            job.attempts -= 1  # it never ran: a refusal costs no retry
            log.info("%s is shutting down and did not run a task; sending it elsewhere", address)
            self._requeue(job, address)
        elif job.attempts <= job.retries and not job.pinned:
            log.warning("re-running a task from %s elsewhere (attempt %d of %d)",
                        address, job.attempts + 1, job.retries + 1)
            self._requeue(job, address)
        else:
            why = "retries=0" if job.retries == 0 else f"after {job.attempts} attempts"
            settle(job.future, None, ServerLostError(
                f"task lost with its server ({why}): {'; '.join(job.errors)}",
                address=srv.address if srv else None))
        self.dispatch()

    def _requeue(self, job: _Job, address: str) -> None:
        """Put ``job`` back at the head of the queue, unless the cluster closed meanwhile."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._queue.append(job, front=True)
        if closed:
            self._cancel_closed(job, address)

    @staticmethod
    def _cancel_closed(job: _Job, address: str) -> None:
        settle(job.future, None, TaskCancelledError(
            f"the cluster was closed before the task finished on {address}", address=address))

    def _drained(self, srv: _Server, exc: BaseException) -> None:
        """``srv`` is shutting down: no new tasks for it until it is reconnected."""
        with self._lock:
            first = srv.draining is None
            if first:
                srv.draining = ServerDrainingError(
                    f"{srv.address} is shutting down ({exc})", address=srv.address)
        if first:
            log.warning("server %s is shutting down: no new tasks go there", srv.address)
