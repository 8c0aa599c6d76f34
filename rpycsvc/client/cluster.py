"""Many servers as one: load-balanced futures, lazy maps, retries when a server dies.

A :class:`Cluster` keeps one :class:`~rpycsvc.client.connection.Client` per server and a local queue
of jobs. A job goes to the server with the most free capacity (its worker count times a
small pipelining factor), so bigger servers get more work and a slow one gets less; among
equally loaded servers the pick takes turns, so work spreads over all of them. A job goes
straight to a server when nothing waits in the queue; the queue holds only what no server
has room for.

What is re-run, and what is not:

- a connection dies (the server crashed, was killed, froze past ``lost_after``, or cut off
  a running task at the end of its shutdown grace): its jobs go back to the queue up to
  ``retries`` times (at-least-once: a frozen server's workers may still finish them; with
  ``retries=0``, at-most-once) and the server is reconnected in the background;
- a server shutting down refuses a task, or drops it before it started
  (:class:`ServerDrainingError`): the task never ran, so it goes to another server
  whatever ``retries`` says, and that server gets no new tasks until it is reconnected;
- nothing else is re-run: a task that raised, timed out or was too large fails as it is,
  and :meth:`Cluster.close` cancels what is in flight instead of sending it elsewhere.

If no server is left, every waiting job fails at once with :class:`AllServersFailedError`
naming each server and its own cause.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import as_completed as _as_completed
from concurrent.futures import wait as _wait
from typing import Any, Callable

from rpycsvc.client.calls import decode_reply, frames_of_call
from rpycsvc.client.connect import connect
from rpycsvc.client.connection import Client
from rpycsvc.client.discovery import read_hosts_file
from rpycsvc.client.environment import misfits
from rpycsvc.client.executor import ClusterExecutor, _ClusterOptions
from rpycsvc.client.future import TaskFuture, settle
from rpycsvc.client.jobs import DEFAULT_RETRIES, _Job, _JobQueue, _Server
from rpycsvc.client.local import _LocalServer
from rpycsvc.client.taskoptions import check_options
from rpycsvc.errors import (
    AllServersFailedError,
    ConfigError,
    ConnectError,
    RemoteTaskError,
    RpycsvcError,
    RpycsvcTimeoutError,
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


class BroadcastResult(dict):
    """``broadcast()``'s answer: address → result or exception, plus the two halves."""

    @property
    def succeeded(self) -> dict[str, Any]:
        return {a: r for a, r in self.items() if not isinstance(r, BaseException)}

    @property
    def failed(self) -> dict[str, BaseException]:
        return {a: r for a, r in self.items() if isinstance(r, BaseException)}


#: The clusters ``rpycsvc deploy HOST... --run SCRIPT`` made for SCRIPT, newest last: what
#: :meth:`Cluster.deployed` returns. Client state, so it lives here; the deploy command
#: appends to it (and this module never imports the deployment code).
_DEPLOYED: list[Cluster] = []


class Cluster:
    """Connect to several servers and run tasks on them as one pool.

    ``servers`` is a list of ``"host[:port]"`` (or a path to a hosts file). Unreachable
    servers are reported in :attr:`unreachable` and skipped unless ``require_all``.
    ``retries`` bounds how often a task is re-run after its server was lost (0 for tasks
    with side effects: at-most-once). ``timeout`` bounds connecting (each server, and all
    of them together within ``timeout + 5`` s); ``lost_after`` is how many seconds of
    silence make a server count as lost (default: :func:`rpycsvc.connect`'s).
    ``forward_modules`` (default True) lets the servers get this program's own modules they
    lack from us while a task imports them, and ``forward_packages`` names installed
    pure-Python distributions that may be sent the same way (see :mod:`rpycsvc.protocol.forwarding`;
    passed on to :func:`rpycsvc.connect`, as by ``Cluster.local`` and ``deploy``). Other
    keywords go to :func:`rpycsvc.connect` (``authkey``, ``ssl``, ``output``, ``prefix``...) or
    become default task options (``mode``, ``output``); a per-task time limit is set with
    :meth:`options` (``cluster.options(timeout=5)``).
    """

    def __init__(self, servers: Iterable[str] | str, *, require_all: bool = False,
                 retries: int = DEFAULT_RETRIES, reconnect: bool = True,
                 timeout: float = 10.0, lost_after: float | None = None,
                 **options: Any) -> None:
        addresses = read_hosts_file(servers) if isinstance(servers, str) else list(servers)
        if not addresses:
            raise ConfigError("Cluster needs at least one server address")
        if lost_after is not None:
            options["lost_after"] = lost_after
        self._setup(retries, reconnect, timeout, options)
        self._connect_all(addresses, require_all)

    def _setup(self, retries: int, reconnect: bool, timeout: float,
               options: dict[str, Any]) -> None:
        if retries < 0:
            raise ConfigError(f"retries must be >= 0; got {retries!r}")
        self.retries = retries
        self.reconnect = reconnect
        self.timeout = timeout
        self._connect_kw = {k: options.pop(k) for k in
                            ("authkey", "ssl", "output", "prefix", "server_hostname",
                             "forward_logging", "lost_after", "forward_modules",
                             "forward_packages")
                            if k in options}
        self._defaults = check_options(options)
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
        self._owned: list[Any] = []  # servers we started (Cluster.local, deploy): stopped on close
        self.unreachable: dict[str, BaseException] = {}

    @classmethod
    def from_clients(cls, clients: Iterable[Client], *, owned: Iterable[Any] = (),
                     unreachable: dict[str, BaseException] | None = None,
                     retries: int = DEFAULT_RETRIES, **options: Any) -> Cluster:
        """A cluster over connections made elsewhere (e.g. ssh pipes by ``deploy``).

        They can't be redialled, so a lost one stays lost; ``owned`` things (with a
        ``stop()``) are stopped on ``close()``.
        """
        self = cls.__new__(cls)
        self._setup(retries, False, 10.0, options)
        for client in clients:
            client.on_lost(self._on_lost)
            srv = _Server(client.address)
            self._attach_locked(srv, client)
        self._owned = list(owned)
        self.unreachable = dict(unreachable or {})
        return self

    @classmethod
    def deployed(cls) -> Cluster:
        """The cluster ``rpycsvc deploy HOST... --run SCRIPT`` deployed for SCRIPT."""
        if not _DEPLOYED:
            raise ConfigError("no deployed cluster: run this script with "
                              "'rpycsvc deploy HOST... --run SCRIPT'")
        return _DEPLOYED[-1]

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def local(cls, n: int = 2, *, workers: int | None = None, timeout: float = 30.0,
              server_args: Iterable[str] = (), **kwargs: Any) -> Cluster:
        """Start ``n`` servers on this machine (stopped on ``close()``) and connect to them.

        Each gets ``workers`` processes (default: this machine's cores shared between them)
        and this process's ``sys.path`` as its ``PYTHONPATH``, so it can import what we can
        (task modules, ``--service``/``--endpoints`` modules given in ``server_args``).
        What the server processes themselves print (classic ``execute("print(...)")``)
        goes to our stderr, each line prefixed with ``[host:port] ``, next to their logs
        (our stdout stays our program's and its tasks'); with ``output="discard"`` it is
        dropped. Other keywords (``lost_after``, ``retries``...) go to :class:`Cluster`.
        """
        if n < 1:
            raise ConfigError(f"Cluster.local needs n >= 1; got {n!r}")
        per = workers or max(1, (os.cpu_count() or 1) // n)
        forward = kwargs.get("output", "stream") != "discard"
        procs = [_LocalServer(per, list(server_args), forward=forward) for _ in range(n)]
        try:
            addresses = [p.wait_address(timeout) for p in procs]
            cluster = cls(addresses, require_all=True, **kwargs)
        except BaseException:
            for p in procs:
                p.stop()
            raise
        cluster._owned = procs
        return cluster

    @classmethod
    def discover(cls, registry_host: str = "127.0.0.1", registry_port: int = 18811,
                 mode: str = "TCP", timeout: float = 5, **kw: Any) -> Cluster:
        """Connect to every rpycsvc server an RPyC registry knows (``rpycsvc registry``;
        servers started with ``rpycsvc serve --register``). ``timeout`` bounds the query
        and each connection; other keywords go to :class:`Cluster`."""
        from rpycsvc.client.discovery import discover

        addresses = discover(registry_host, registry_port, mode, timeout)
        if not addresses:
            raise ConnectError(
                f"the registry at {registry_host}:{registry_port} ({mode}) knows no rpycsvc "
                "server; start servers with `rpycsvc serve --register --registry-type "
                f"{mode.upper()} --registry-host {registry_host} --registry-port {registry_port}`")
        return cls(addresses, timeout=timeout, **kw)

    def _connect_all(self, addresses: list[str], require_all: bool) -> None:
        """Connect to every server at once, waiting ``timeout + 5`` s in all; a connection
        that completes after that is closed (the server was reported unreachable)."""
        results: dict[str, Client | BaseException] = {}
        gate = threading.Lock()
        late: list[bool] = []  # non-empty once we stopped waiting

        def attempt(addr: str) -> None:
            res: Client | BaseException
            try:
                res = self._open(addr)
            except BaseException as exc:
                res = exc
            with gate:
                if not late:
                    results[addr] = res
                    return
            if isinstance(res, Client):
                log.info("closing the connection to %s: it was made after the cluster "
                         "stopped waiting for it", addr)
                res.close()

        threads = [threading.Thread(target=attempt, args=(a,), daemon=True,
                                    name=f"rpycsvc-connect-{a}") for a in addresses]
        for t in threads:
            t.start()
        limit = self.timeout + 5
        deadline = time.monotonic() + limit
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with gate:
            late.append(True)
            final = dict(results)
        for addr in addresses:
            res = final[addr] if addr in final else RpycsvcTimeoutError(
                f"connecting to {addr} did not finish within {limit:g} s")
            srv = _Server(addr)
            if isinstance(res, Client):
                with self._lock:
                    self._attach_locked(srv, res)
            else:
                srv.error = res
                self.unreachable[addr] = res
                log.warning("server %s is unreachable: %s", addr, res)
        if self.unreachable and (require_all or not self._servers):
            self.close()
            cls = AllServersFailedError if not self._servers else ConnectError
            if cls is ConnectError:
                detail = "; ".join(f"{a}: {e}" for a, e in self.unreachable.items())
                raise ConnectError(f"not every server is reachable: {detail}")
            raise AllServersFailedError("no server is reachable", self.unreachable)

    def _open(self, addr: str) -> Client:
        client = connect(addr, timeout=self.timeout, **self._connect_kw)
        client.on_lost(self._on_lost)
        return client

    def add(self, address: str) -> Client:
        """Connect one more server (or reconnect a known one) and start using it."""
        client = self._open(address)
        with self._lock:
            srv = self._servers.get(client.address) or _Server(client.address)
            self._attach_locked(srv, client)
            self.unreachable.pop(address, None)
        self._dispatch()
        return client

    def _attach_locked(self, srv: _Server, client: Client) -> None:
        """``srv`` uses ``client`` from now on (first connection or reconnection)."""
        srv.attach(client)
        if self._servers.get(srv.address) is not srv:
            self._servers[srv.address] = srv
            self._ring = list(self._servers.values())
        if client.environment.conflict is not None:
            self._mixed = True  # (never reset: misfits() itself is exact, only slower)

    # -- access --------------------------------------------------------------------------------
    @property
    def addresses(self) -> list[str]:
        """Every server this cluster knows, up or down."""
        return list(self._servers)

    @property
    def clients(self) -> list[Client]:
        """The connections that are up now."""
        return [s.client for s in self._servers.values() if s.up]  # type: ignore[misc]

    def __getitem__(self, which: int | str) -> Client:
        """``cluster[0]`` or ``cluster["host:port"]``: that server's connection."""
        srv: _Server | None
        if isinstance(which, int):
            srv = list(self._servers.values())[which]
        else:
            srv = self._servers.get(which) or next(
                (s for a, s in self._servers.items() if a.split(":")[0] == which), None)
            if srv is None:
                raise KeyError(f"no server {which!r} in this cluster; have {self.addresses}")
        if not srv.up:
            raise ServerLostError(f"{srv.address} is down: {srv.error}", address=srv.address)
        return srv.client  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._servers)

    def options(self, **opts: Any) -> _ClusterOptions:
        """The same API (``submit``, ``map``) with task options: ``timeout`` (seconds each
        task may run, enforced on the server: :class:`TaskTimeoutError`; in a ``map`` it
        limits every task, not the whole map), ``mode`` (``"process"``/``"thread"``),
        ``output``, and ``retries``."""
        retries = opts.pop("retries", None)
        return _ClusterOptions(self, {**self._defaults, **check_options(opts)}, retries)

    # -- submitting ------------------------------------------------------------------------------
    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run ``fn(*args, **kwargs)`` on the least busy server; returns a Future at once."""
        return self._submit(fn, args, kwargs, self._defaults, self.retries)

    def _submit(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                opts: dict[str, Any], retries: int, pinned: str | None = None) -> TaskFuture:
        kind, spec, frames = frames_of_call(fn, args, kwargs)
        label = spec if spec else getattr(fn, "__qualname__", "task")
        fut = TaskFuture()
        job = _Job(kind, spec, frames, {**opts, "label": label}, fut, retries, pinned)
        fut._stopper = functools.partial(self._stop_job, job)
        self._enqueue([job])
        return fut

    def _enqueue(self, jobs: list[_Job]) -> None:
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
            self._dispatch()

    def _stop_job(self, job: _Job) -> None:
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
            self._dispatch()
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
        if stop:  # stopped while we sent it: _stop_job had no key
            client.cancel_task(key)

    def _dispatch(self) -> None:
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
                job.observe(job.size, time.monotonic() - job.sent if service is None
                            else service)
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
                    self._dispatch()
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
            self._dispatch()
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
        self._dispatch()

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

    # -- failures --------------------------------------------------------------------------------
    def _on_lost(self, client: Client, exc: BaseException) -> None:
        with self._lock:
            srv = self._servers.get(client.address)
            if srv is None or srv.client is not client:
                return
            srv.client, srv.error = None, exc  # (draining stays until reconnected)
            start = self.reconnect and not self._closed and not srv.reconnecting
            srv.reconnecting = srv.reconnecting or start
        if not self._closed:
            log.warning("lost server %s: %s", client.address, exc)
        if start:
            threading.Thread(target=self._reconnect, args=(srv,), daemon=True,
                             name=f"rpycsvc-reconnect-{srv.address}").start()
        self._dispatch()

    def _reconnect(self, srv: _Server) -> None:
        delay = 0.2
        try:
            while not self._closed:
                time.sleep(delay)
                try:
                    client = self._open(srv.address)
                except Exception as exc:  # whatever it was, keep trying: never die silently
                    if not isinstance(exc, (RpycsvcError, OSError)):
                        log.debug("reconnecting to %s: %r", srv.address, exc)
                    srv.error = exc
                    delay = min(delay * 2, 5.0)
                    continue
                with self._lock:
                    closed = self._closed
                    if not closed:
                        self._attach_locked(srv, client)
                if closed:
                    client.close()
                    return
                log.info("reconnected to %s", srv.address)
                self._dispatch()
                return
        finally:
            srv.reconnecting = False

    # -- fan-out helpers (see _mapping.py for map and map_reduce) --------------------------------
    def map(self, fn: Any, *iterables: Iterable[Any], ordered: bool = True,
            chunksize: int | None = None, timeout: float | None = None,
            progress: bool = False, retries: int | None = None, **opts: Any) -> Iterator[Any]:
        """Lazily apply ``fn`` to the items, in input order (or as completed).

        At most a few jobs per worker are in flight, so endless generators work and memory
        stays bounded. Small tasks are batched automatically unless ``chunksize`` is given.
        ``timeout`` is a deadline for the whole iteration, as in ``Executor.map``: a result
        not ready ``timeout`` seconds after this call raises :class:`RpycsvcTimeoutError`
        (also a ``TimeoutError``) and the map's remaining tasks are stopped. To limit how
        long each task may run, use ``cluster.options(timeout=S).map(...)``. The first task
        that raised re-raises its exception when its result is reached. Other keywords
        (``mode``, ``output``) are task options.
        """
        return self._map(fn, iterables, ordered=ordered, chunksize=chunksize, timeout=timeout,
                         progress=progress, retries=self.retries if retries is None else retries,
                         opts={**self._defaults, **check_options(opts)})

    def _map(self, fn: Any, iterables: tuple[Iterable[Any], ...], *, ordered: bool,
             chunksize: int | None, timeout: float | None, progress: bool, retries: int,
             opts: dict[str, Any]) -> Iterator[Any]:
        from rpycsvc.client.mapping import run_map

        return run_map(self, fn, iterables, ordered=ordered, chunksize=chunksize,
                       timeout=timeout, progress=progress, retries=retries, opts=opts)

    def map_reduce(self, fn: Any, reducer: Callable[[Any, Any], Any], iterable: Iterable[Any],
                   *, initializer: Any = None, by_key: bool = False,
                   chunksize: int | None = None, timeout: float | None = None,
                   progress: bool = False) -> Any:
        """``reduce(reducer, map(fn, iterable))`` where each server reduces its own partial
        results and only the partials travel back. With ``by_key``, ``fn`` yields
        ``(key, value)`` pairs and the answer is a dict reducing the values of each key.
        ``timeout`` is a deadline for the whole call (:class:`RpycsvcTimeoutError`). If a
        chunk fails or the deadline passes, the other chunks are stopped. ``progress``
        shows a bar on stderr as ``map``'s does (items done, per server)."""
        from rpycsvc.client.mapping import run_map_reduce

        return run_map_reduce(self, fn, reducer, iterable, initializer=initializer,
                              by_key=by_key, chunksize=chunksize, timeout=timeout,
                              progress=progress)

    def as_completed(self, futures: Iterable[Future], timeout: float | None = None
                     ) -> Iterator[Future]:
        """``concurrent.futures.as_completed`` for this cluster's futures."""
        return _as_completed(futures, timeout=timeout)

    def wait(self, futures: Iterable[Future], timeout: float | None = None,
             return_when: str = "ALL_COMPLETED") -> Any:
        return _wait(futures, timeout=timeout, return_when=return_when)

    def broadcast(self, fn: Any, /, *args: Any, timeout: float | None = None,
                  wait: bool = True, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once on every server that takes tasks, wait for all.

        Returns a :class:`BroadcastResult`: address → result or exception, for every server
        of the cluster (one that is down or shutting down gets its cause). ``timeout`` is
        one deadline for all servers together: a server that has not answered by then gets
        an :class:`RpycsvcTimeoutError` and its task is stopped there. With
        ``wait=False`` return ``{address: future}`` at once (for long-running loops).
        """
        with self._lock:
            targets = [a for a, s in self._servers.items() if s.usable]
        futs = {a: self._submit(fn, args, kwargs, self._defaults, 0, pinned=a) for a in targets}
        if not wait:
            return futs
        _wait(list(futs.values()), timeout=timeout)
        out = BroadcastResult()
        for addr, f in futs.items():
            if not f.done():
                f.stop()  # on the server too
                out[addr] = RpycsvcTimeoutError(
                    f"{addr} did not answer within {timeout:g} s; the task was stopped there")
                continue
            try:
                out[addr] = f.result(0)
            except BaseException as exc:
                out[addr] = exc
        for addr, srv in self._servers.items():
            if addr not in out:
                cause = srv.cause()
                out[addr] = cause if isinstance(cause, BaseException) else ServerLostError(
                    f"{addr} is {cause}", address=addr)
        return out

    def task(self, fn: Any = None, /, **options: Any) -> Any:
        """Decorator (``@cluster.task`` or ``@cluster.task(timeout=5)``) giving the function
        Celery's ``.delay(*args)`` and ``.apply_async(args, kwargs, timeout=...)``."""
        from rpycsvc.client.tasks import RemoteTask

        if fn is None:
            return lambda f: RemoteTask(self, f, **options)
        return RemoteTask(self, fn, **options)

    def executor(self) -> ClusterExecutor:
        """A real ``concurrent.futures.Executor`` running on this cluster."""
        return ClusterExecutor(self)

    def stats(self) -> dict[str, dict[str, Any] | BaseException]:
        """Each server's stats, or the exception for a server that is down."""
        out: dict[str, dict[str, Any] | BaseException] = {}
        for addr in self._servers:
            try:
                out[addr] = self[addr].stats()
            except BaseException as exc:
                out[addr] = exc
        return out

    @property
    def total_workers(self) -> int:
        """Process workers over every server that takes tasks."""
        return sum(s.client.workers for s in self._servers.values() if s.client and s.usable)

    @property
    def total_threads(self) -> int:
        """Thread-mode slots over every server that takes tasks."""
        return sum(s.client.threads for s in self._servers.values() if s.client and s.usable)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel every task not finished yet, close every connection, stop servers we started.

        Queued and running tasks fail with :class:`TaskCancelledError`; running ones are
        stopped on their servers (a server stops the tasks of a connection that closes).
        Nothing is sent to another server.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            queued = self._queue.clear()
            running = [(s.address, j) for s in self._servers.values() for j in s.inflight]
            clients = [s.client for s in self._servers.values() if s.client is not None]
        for job in queued:
            self._fail_unsent(job, TaskCancelledError(
                "the cluster was closed before the task was sent to a server"))
        for address, job in running:
            self._cancel_closed(job, address)
        for client in clients:
            client.close()
        for proc in self._owned:
            proc.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        up = sum(1 for s in self._servers.values() if s.up)
        return f"<rpycsvc.Cluster {up}/{len(self._servers)} servers up>"

    def _repr_html_(self) -> str:
        """The cluster as Jupyter shows it: each server, its workers, tasks running/done."""
        from rpycsvc.client.html import cluster_html

        return cluster_html(self)



