"""Many servers as one: load-balanced futures, lazy maps, retries when a server dies.

A :class:`Cluster` keeps one :class:`~rpycsvc.client.connection.Client` per server: it
connects to them (``Cluster(...)``, :meth:`Cluster.local`, :meth:`Cluster.discover`,
:meth:`Cluster.from_clients`), reconnects a lost one in the background, and offers the API
(``submit``, ``map``, ``broadcast``, ``stats``...). Which server runs a job, and what is
re-run when a server dies or shuts down, is its :class:`~rpycsvc.client.scheduler.Scheduler`'s
business (see there).
"""


from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import as_completed as _as_completed
from concurrent.futures import wait as _wait
from typing import Any, Callable

from rpycsvc.client.connect import connect
from rpycsvc.client.connection import Client
from rpycsvc.client.discovery import read_hosts_file
from rpycsvc.client.executor import ClusterExecutor
from rpycsvc.client.future import TaskFuture
from rpycsvc.client.html import cluster_html
from rpycsvc.client.jobs import DEFAULT_RETRIES, _Server
from rpycsvc.client.local import _LocalServer
from rpycsvc.client.mapping import run_map, run_map_reduce
from rpycsvc.client.scheduler import Scheduler
from rpycsvc.client.taskoptions import check_options
from rpycsvc.client.tasks import RemoteTask
from rpycsvc.errors import (
    AllServersFailedError,
    ConfigError,
    ConnectError,
    RpycsvcError,
    RpycsvcTimeoutError,
    ServerLostError,
)

log = logging.getLogger("rpycsvc.cluster")


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
        #: the servers, the queue of jobs, the pick and the retries
        self._scheduler = Scheduler()
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
            self._scheduler.attach(srv, client)
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
                self._scheduler.attach(srv, res)
            else:
                srv.error = res
                self.unreachable[addr] = res
                log.warning("server %s is unreachable: %s", addr, res)
        if self.unreachable and (require_all or not self._scheduler.servers):
            self.close()
            cls = AllServersFailedError if not self._scheduler.servers else ConnectError
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
        self._scheduler.add(client)
        self.unreachable.pop(address, None)
        self._scheduler.dispatch()
        return client

    # -- access --------------------------------------------------------------------------------
    @property
    def addresses(self) -> list[str]:
        """Every server this cluster knows, up or down."""
        return list(self._scheduler.servers)

    @property
    def clients(self) -> list[Client]:
        """The connections that are up now."""
        return self._scheduler.clients

    def __getitem__(self, which: int | str) -> Client:
        """``cluster[0]`` or ``cluster["host:port"]``: that server's connection."""
        srv: _Server | None
        servers = self._scheduler.servers
        if isinstance(which, int):
            srv = list(servers.values())[which]
        else:
            srv = servers.get(which) or next(
                (s for a, s in servers.items() if a.split(":")[0] == which), None)
            if srv is None:
                raise KeyError(f"no server {which!r} in this cluster; have {self.addresses}")
        if not srv.up:
            raise ServerLostError(f"{srv.address} is down: {srv.error}", address=srv.address)
        return srv.client  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._scheduler.servers)

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
        return self._scheduler.submit(fn, args, kwargs, self._defaults, self.retries)

    # -- failures --------------------------------------------------------------------------------
    def _on_lost(self, client: Client, exc: BaseException) -> None:
        srv, start = self._scheduler.lost(client, exc, self.reconnect)
        if srv is None:
            return
        if not self._scheduler.closed:
            log.warning("lost server %s: %s", client.address, exc)
        if start:
            threading.Thread(target=self._reconnect, args=(srv,), daemon=True,
                             name=f"rpycsvc-reconnect-{srv.address}").start()
        self._scheduler.dispatch()

    def _reconnect(self, srv: _Server) -> None:
        delay = 0.2
        try:
            while not self._scheduler.closed:
                time.sleep(delay)
                try:
                    client = self._open(srv.address)
                except Exception as exc:  # whatever it was, keep trying: never die silently
                    if not isinstance(exc, (RpycsvcError, OSError)):
                        log.debug("reconnecting to %s: %r", srv.address, exc)
                    srv.error = exc
                    delay = min(delay * 2, 5.0)
                    continue
                if not self._scheduler.reattach(srv, client):  # closed meanwhile
                    client.close()
                    return
                log.info("reconnected to %s", srv.address)
                self._scheduler.dispatch()
                return
        finally:
            srv.reconnecting = False

    # -- fan-out helpers (see mapping.py for map and map_reduce) ---------------------------------
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
        return run_map(self._scheduler, fn, iterables, ordered=ordered, chunksize=chunksize,
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
        scheduler = self._scheduler
        targets = scheduler.usable_addresses()
        futs = {a: scheduler.submit(fn, args, kwargs, self._defaults, 0, pinned=a)
                for a in targets}
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
        for addr, srv in scheduler.servers.items():
            if addr not in out:
                cause = srv.cause()
                out[addr] = cause if isinstance(cause, BaseException) else ServerLostError(
                    f"{addr} is {cause}", address=addr)
        return out

    def task(self, fn: Any = None, /, **options: Any) -> Any:
        """Decorator (``@cluster.task`` or ``@cluster.task(timeout=5)``) giving the function
        Celery's ``.delay(*args)`` and ``.apply_async(args, kwargs, timeout=...)``."""
        if fn is None:
            return lambda f: RemoteTask(self, f, **options)
        return RemoteTask(self, fn, **options)

    def executor(self) -> ClusterExecutor:
        """A real ``concurrent.futures.Executor`` running on this cluster."""
        return ClusterExecutor(self)

    def stats(self) -> dict[str, dict[str, Any] | BaseException]:
        """Each server's stats, or the exception for a server that is down."""
        out: dict[str, dict[str, Any] | BaseException] = {}
        for addr in self._scheduler.servers:
            try:
                out[addr] = self[addr].stats()
            except BaseException as exc:
                out[addr] = exc
        return out

    @property
    def total_workers(self) -> int:
        """Process workers over every server that takes tasks."""
        return self._scheduler.total_workers

    @property
    def total_threads(self) -> int:
        """Thread-mode slots over every server that takes tasks."""
        return self._scheduler.total_threads

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel every task not finished yet, close every connection, stop servers we started.

        Queued and running tasks fail with :class:`TaskCancelledError`; running ones are
        stopped on their servers (a server stops the tasks of a connection that closes).
        Nothing is sent to another server.
        """
        clients = self._scheduler.close()
        if clients is None:  # closed already
            return
        for client in clients:
            client.close()
        for proc in self._owned:
            proc.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        servers = self._scheduler.servers
        up = sum(1 for s in servers.values() if s.up)
        return f"<rpycsvc.Cluster {up}/{len(servers)} servers up>"

    def _repr_html_(self) -> str:
        """The cluster as Jupyter shows it: each server, its workers, tasks running/done."""
        return cluster_html(self)


class _ClusterOptions:
    """``cluster.options(...)``: ``submit`` and ``map`` with these task options. Its
    ``timeout`` is each task's limit, enforced on the server, for ``map`` too."""

    def __init__(self, cluster: Cluster, opts: dict[str, Any], retries: int | None) -> None:
        self._c, self._opts = cluster, opts
        self._retries = cluster.retries if retries is None else retries

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> TaskFuture:
        return self._c._scheduler.submit(fn, args, kwargs, self._opts, self._retries)

    def map(self, fn: Any, *iterables: Iterable[Any], ordered: bool = True,
            chunksize: int | None = None, timeout: float | None = None,
            progress: bool = False, retries: int | None = None, **opts: Any) -> Iterator[Any]:
        """:meth:`Cluster.map` with these options: each task may run for the options'
        ``timeout`` (:class:`TaskTimeoutError` for that item), while ``timeout`` here is
        the deadline for the whole iteration (:class:`RpycsvcTimeoutError`)."""
        return self._c._map(fn, iterables, ordered=ordered, chunksize=chunksize,
                            timeout=timeout, progress=progress,
                            retries=self._retries if retries is None else retries,
                            opts={**self._opts, **check_options(opts)})
