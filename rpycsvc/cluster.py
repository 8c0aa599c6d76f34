"""Many servers as one: load-balanced futures, lazy maps, retries when a server dies.

A :class:`Cluster` keeps one :class:`~rpycsvc.client.Client` per server and a local queue
of jobs. A job goes to the server with the most free capacity (its worker count times a
small pipelining factor), so bigger servers get more work and a slow one gets less. When a
connection dies, the jobs it had in flight go back to the queue (up to ``retries`` times)
and the server is reconnected in the background; if no server is left, every waiting job
fails at once with :class:`AllServersFailedError` naming each server and its cause.
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

from ._jobs import DEFAULT_RETRIES, _Job, _JobQueue, _Server
from ._local import _LocalServer
from .client import (
    Client,
    TaskFuture,
    _check_options,
    connect,
    frames_of_call,
    settle,
    settle_reply,
)
from .errors import (
    AllServersFailedError,
    ConfigError,
    ConnectError,
    RpycsvcError,
    ServerLostError,
)
from .executor import ClusterExecutor, _ClusterOptions

log = logging.getLogger("rpycsvc.cluster")



class BroadcastResult(dict):
    """``broadcast()``'s answer: address → result or exception, plus the two halves."""

    @property
    def succeeded(self) -> dict[str, Any]:
        return {a: r for a, r in self.items() if not isinstance(r, BaseException)}

    @property
    def failed(self) -> dict[str, BaseException]:
        return {a: r for a, r in self.items() if isinstance(r, BaseException)}


def read_hosts_file(path: str) -> list[str]:
    """``host[:port]`` per line; ``#`` starts a comment; blank lines are skipped."""
    try:
        with open(path) as f:
            lines = [ln.split("#", 1)[0].strip() for ln in f]
    except OSError as exc:
        raise ConfigError(f"can't read hosts file {path!r}: {exc.strerror or exc}") from exc
    hosts = [ln for ln in lines if ln]
    if not hosts:
        raise ConfigError(f"hosts file {path!r} names no servers")
    return hosts


class Cluster:
    """Connect to several servers and run tasks on them as one pool.

    ``servers`` is a list of ``"host[:port]"`` (or a path to a hosts file). Unreachable
    servers are reported in :attr:`unreachable` and skipped unless ``require_all``.
    ``retries`` bounds how often a task is re-run after its server died (0 for tasks with
    side effects). Other keywords go to :func:`rpycsvc.connect` (``authkey``, ``ssl``,
    ``output``, ``prefix``, ``timeout``) or become default task options.
    """

    def __init__(self, servers: Iterable[str] | str, *, require_all: bool = False,
                 retries: int = DEFAULT_RETRIES, reconnect: bool = True,
                 timeout: float = 10.0, **options: Any) -> None:
        addresses = read_hosts_file(servers) if isinstance(servers, str) else list(servers)
        if not addresses:
            raise ConfigError("Cluster needs at least one server address")
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
                             "forward_logging")
                            if k in options}
        self._defaults = _check_options(options)
        self._lock = threading.Lock()
        self._servers: dict[str, _Server] = {}
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
            srv.client = client
            self._servers[client.address] = srv
        self._owned = list(owned)
        self.unreachable = dict(unreachable or {})
        return self

    @classmethod
    def deployed(cls) -> Cluster:
        """The cluster ``rpycsvc deploy HOST... --run SCRIPT`` deployed for SCRIPT."""
        from .deployment import _DEPLOYED

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
        """
        if n < 1:
            raise ConfigError(f"Cluster.local needs n >= 1; got {n!r}")
        per = workers or max(1, (os.cpu_count() or 1) // n)
        procs = [_LocalServer(per, list(server_args)) for _ in range(n)]
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
        from .registry import discover

        addresses = discover(registry_host, registry_port, mode, timeout)
        if not addresses:
            raise ConnectError(
                f"the registry at {registry_host}:{registry_port} ({mode}) knows no rpycsvc "
                "server; start servers with `rpycsvc serve --register --registry-type "
                f"{mode.upper()} --registry-host {registry_host} --registry-port {registry_port}`")
        return cls(addresses, timeout=timeout, **kw)

    def _connect_all(self, addresses: list[str], require_all: bool) -> None:
        results: dict[str, Client | BaseException] = {}

        def attempt(addr: str) -> None:
            try:
                results[addr] = self._open(addr)
            except BaseException as exc:
                results[addr] = exc

        threads = [threading.Thread(target=attempt, args=(a,), daemon=True) for a in addresses]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout + 5)
        for addr in addresses:
            res = results.get(addr, ConnectError(f"connecting to {addr} did not finish"))
            srv = _Server(addr)
            if isinstance(res, Client):
                srv.client = res
                self._servers[res.address] = srv
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
            srv.client, srv.error = client, None
            self._servers[client.address] = srv
            self.unreachable.pop(address, None)
        self._dispatch()
        return client

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
        """The same API with task options: ``timeout`` (s, enforced on the server),
        ``mode`` (``"process"``/``"thread"``), ``output``, and ``retries``."""
        retries = opts.pop("retries", None)
        return _ClusterOptions(self, {**self._defaults, **_check_options(opts)}, retries)

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
        fut._canceller = lambda: self._cancel(job)
        self._enqueue([job])
        return fut

    def _enqueue(self, jobs: list[_Job]) -> None:
        with self._lock:
            if self._closed:
                raise RpycsvcError("this cluster is closed")
            for job in jobs:
                self._queue.append(job)
        self._dispatch()

    def _cancel(self, job: _Job) -> None:
        with self._lock:
            if self._queue.remove(job):
                return
            srv, key = job.server, job.key
        if srv is not None and srv.client is not None:
            srv.client.cancel_task(key)

    def _pick_locked(self, job: _Job) -> _Server | None:
        best, best_load = None, 1.0
        mode = job.opts.get("mode", "process")
        for srv in self._servers.values():
            if not srv.up or (job.pinned and srv.address != job.pinned):
                continue
            load = srv.load(mode)
            if load < best_load:
                best, best_load = srv, load
        return best

    def _dispatch(self) -> None:
        """Send queued jobs to servers with free slots; fail them all if none is left."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                if not any(s.up for s in self._servers.values()):
                    doomed = self._queue.clear()
                    causes = {a: (s.error or "down") for a, s in self._servers.items()}
                    break
                job: _Job | None = None
                srv: _Server | None = None
                for cand in self._queue.heads():
                    srv = self._pick_locked(cand)
                    if srv is not None:
                        job = cand
                        break
                if job is None or srv is None:
                    return
                self._queue.popleft(job)
                job.server = srv
                job.attempts += 1
                job.sent = time.monotonic()
                srv.inflight.add(job)
                srv.threaded += job.opts.get("mode") == "thread"
                client = srv.client
                if isinstance(job.future, TaskFuture):
                    job.future.address = srv.address
            try:
                assert client is not None
                job.key = client.start_task(job.kind, job.spec, job.opts, job.frames,
                                            functools.partial(self._on_done, job), job.future)
            except ServerLostError as exc:
                self._on_done(job, "lost", exc)
        err = AllServersFailedError("every server of the cluster is down", causes)
        for job in doomed:
            settle(job.future, None, err)

    def _on_done(self, job: _Job, status: str, value: Any) -> None:
        srv = job.server
        with self._lock:
            if srv is not None and job in srv.inflight:
                srv.inflight.discard(job)
                srv.threaded -= job.opts.get("mode") == "thread"
        if status == "lost":
            job.errors.append(f"{srv.address if srv else '?'}: {value}")
            if job.future.done():
                pass  # cancelled, or already answered by an earlier attempt
            elif job.attempts <= job.retries and not job.pinned:
                log.warning("re-running a task from %s elsewhere (attempt %d of %d)",
                            srv.address if srv else "?", job.attempts + 1, job.retries + 1)
                with self._lock:
                    self._queue.append(job, front=True)
            else:
                why = "retries=0" if job.retries == 0 else f"after {job.attempts} attempts"
                settle(job.future, None, ServerLostError(
                    f"task lost with its server ({why}): {'; '.join(job.errors)}",
                    address=srv.address if srv else None))
        else:
            settle_reply(job.future, value, srv.address if srv else "?")
        self._dispatch()

    # -- failures --------------------------------------------------------------------------------
    def _on_lost(self, client: Client, exc: BaseException) -> None:
        with self._lock:
            srv = self._servers.get(client.address)
            if srv is None or srv.client is not client:
                return
            srv.client, srv.error = None, exc
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
                except (RpycsvcError, OSError) as exc:
                    srv.error = exc
                    delay = min(delay * 2, 5.0)
                    continue
                with self._lock:
                    if self._closed:
                        client.close()
                        return
                    srv.client, srv.error = client, None
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
        ``timeout`` bounds the wait for each next result (``TimeoutError``); the first
        task that raised re-raises its exception when its result is reached.
        """
        from ._mapping import run_map

        return run_map(self, fn, iterables, ordered=ordered, chunksize=chunksize,
                       timeout=timeout, progress=progress,
                       retries=self.retries if retries is None else retries,
                       opts={**self._defaults, **_check_options(opts)})

    def map_reduce(self, fn: Any, reducer: Callable[[Any, Any], Any], iterable: Iterable[Any],
                   *, initializer: Any = None, by_key: bool = False,
                   chunksize: int | None = None, timeout: float | None = None) -> Any:
        """``reduce(reducer, map(fn, iterable))`` where each server reduces its own partial
        results and only the partials travel back. With ``by_key``, ``fn`` yields
        ``(key, value)`` pairs and the answer is a dict reducing the values of each key."""
        from ._mapping import run_map_reduce

        return run_map_reduce(self, fn, reducer, iterable, initializer=initializer,
                              by_key=by_key, chunksize=chunksize, timeout=timeout)

    def as_completed(self, futures: Iterable[Future], timeout: float | None = None
                     ) -> Iterator[Future]:
        """``concurrent.futures.as_completed`` for this cluster's futures."""
        return _as_completed(futures, timeout=timeout)

    def wait(self, futures: Iterable[Future], timeout: float | None = None,
             return_when: str = "ALL_COMPLETED") -> Any:
        return _wait(futures, timeout=timeout, return_when=return_when)

    def broadcast(self, fn: Any, /, *args: Any, timeout: float | None = None,
                  wait: bool = True, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once on every server that is up and wait for all.

        With ``wait=False`` return ``{address: future}`` at once (for long-running loops).
        """
        futs = {a: self._submit(fn, args, kwargs, self._defaults, 0, pinned=a)
                for a, s in self._servers.items() if s.up}
        if not wait:
            return futs
        out = BroadcastResult()
        for addr, f in futs.items():
            try:
                out[addr] = f.result(timeout)
            except BaseException as exc:
                out[addr] = exc
        for addr, srv in self._servers.items():
            if addr not in out:
                out[addr] = srv.error or ServerLostError(f"{addr} is down", address=addr)
        return out

    def task(self, fn: Any = None, /, **options: Any) -> Any:
        """Decorator (``@cluster.task`` or ``@cluster.task(timeout=5)``) giving the function
        Celery's ``.delay(*args)`` and ``.apply_async(args, kwargs, timeout=...)``."""
        from .tasks import RemoteTask

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
        """Process workers over every server that is up."""
        return sum(s.client.workers for s in self._servers.values() if s.client and s.up)

    @property
    def total_threads(self) -> int:
        """Thread-mode slots over every server that is up."""
        return sum(s.client.threads for s in self._servers.values() if s.client and s.up)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection (pending tasks fail) and stop servers we started."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            queued = self._queue.clear()
        for job in queued:
            settle(job.future, None, RpycsvcError("the cluster was closed"))
        for srv in self._servers.values():
            if srv.client is not None:
                srv.client.close()
        for proc in self._owned:
            proc.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        up = sum(1 for s in self._servers.values() if s.up)
        return f"<rpycsvc.Cluster {up}/{len(self._servers)} servers up>"



