"""What the server exposes over RPyC: compute endpoints, stats, and classic module access.

An rpycsvc client's tasks don't use RPyC calls: after its ``hello`` they travel as task
messages on the same connection (:mod:`rpycsvc.protocol.taskframes`,
:mod:`rpycsvc.server.taskserver`),
by value, many in flight at once. ``exposed_compute`` serves plain RPyC clients: import
paths and endpoint names, with arguments fetched by value. With ``classic`` on, the same connection
also offers RPyC's classic ``modules``/``execute``/``eval`` — remote code execution by
design, for trusted clients only.

Classic access follows RPyC's classic rules (``SlaveService``): every attribute, and no
``exposed_`` lookup, so ``obj.foo`` never turns into ``obj.exposed_foo`` behind the user's
back. The compute methods have plain names for that (``conn.root.compute``); only the
objects this server hosts for clients (queues, ``--service`` objects) keep RPyC's
``exposed_`` convention. The classic service also answers to RPyC's name ``SLAVE``, so
registry lookups made for ``rpyc_classic`` find it.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import socket
import threading
import time
from typing import Any

from rpyc.core import netref
from rpyc.core.service import Service, SlaveService

from rpycsvc.errors import SerializationError, TaskError
from rpycsvc.protocol.liveness import Heartbeat
from rpycsvc.protocol.rpyc_connection import Deferred, ServerConnection
from rpycsvc.protocol.serialization import dumps, loads
from rpycsvc.protocol.tracebacks import load_exception
from rpycsvc.server.hosted import HostedQueue, HostedSpec, QueueRegistry
from rpycsvc.server.pool import WorkerPool
from rpycsvc.server.task import Task
from rpycsvc.server.taskserver import MAX_HELD, TaskEndpoint

log = logging.getLogger("rpycsvc.server")

#: Largest container a plain RPyC client may pass as a netref (fetched element by element).
MAX_NETREF_ITEMS = 100_000


class Runtime:
    """State shared by every connection of one server: the pool, counters, identity."""

    def __init__(self, pool: WorkerPool, *, classic: bool, address: str = "",
                 hosted: dict[str, HostedSpec] | None = None) -> None:
        self.pool = pool
        self.classic = classic
        self.hosted = dict(hosted or {})
        self.queues = QueueRegistry()
        self.address = address
        self.started = time.time()
        self.connections = 0
        self.connections_total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._lock = threading.Lock()
        self._conn_ids = itertools.count(1)
        #: tasks started, by path ("task": rpycsvc clients' task messages, "rpyc": plain
        #: RPyC clients' conn.root.compute) and by transport of the task messages
        self.tasks_by_path = {"task": 0, "rpyc": 0}
        self.tasks_by_transport = {"tcp": 0, "tls": 0, "ssh": 0}
        #: beats on the connections of clients that asked for it in hello (liveness)
        self.heartbeat = Heartbeat()
        #: classes of the objects hosted for clients (queues, ``--service`` objects): their
        #: ``exposed_<name>`` methods answer to ``<name>`` on classic connections too
        self.service_types: set[type] = {HostedQueue}

    def count_task(self, path: str, transport: str | None = None) -> None:
        """Count one task started on ``path`` (and ``transport``) for ``stats()``."""
        with self._lock:
            self.tasks_by_path[path] += 1
            if transport is not None:
                self.tasks_by_transport[transport] += 1

    def connected(self) -> int:
        self.pool.ensure_started()
        with self._lock:
            self.connections += 1
            self.connections_total += 1
            return next(self._conn_ids)

    def disconnected(self) -> None:
        with self._lock:
            self.connections -= 1

    def info(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "address": self.address, "pid": os.getpid(),
                "workers": self.pool.size, "threads": self.pool.threads, "classic": self.classic}

    def stats(self) -> dict[str, Any]:
        from rpycsvc.protocol import handshake

        pool = self.pool.stats()
        rss = _rss(os.getpid())
        try:
            load = os.getloadavg()
        except OSError:
            load = (0.0, 0.0, 0.0)
        return {
            "host": socket.gethostname(),
            "address": self.address,
            "pid": os.getpid(),
            **{f"{k}_version": v for k, v in handshake.versions().items()},
            "platform": platform.platform(),
            "cores": os.cpu_count() or 1,
            **pool,
            "connections": self.connections,
            "connections_total": self.connections_total,
            "uptime": round(time.time() - self.started, 3),
            "load_average": tuple(round(x, 2) for x in load),
            "rss_bytes": rss,
            "rss_total_bytes": rss + sum(_rss(p) for p in [*pool["worker_pids"],
                                                           pool["thread_worker_pid"]] if p),
            "classic": self.classic,
            "tasks_by_path": dict(self.tasks_by_path),
            "tasks_by_transport": dict(self.tasks_by_transport),
        }


def _forget_streams(conn: Any) -> None:
    """Drop this connection's redirects; undo its ``conn.modules.sys.stdout = ...``."""
    import sys

    from rpycsvc.protocol import classic

    for i, name in enumerate(("stdout", "stderr")):
        current = getattr(sys, name)
        # test for a netref first: isinstance() on any other class would ask the (gone) peer
        if isinstance(current, netref.BaseNetref):
            owner = object.__getattribute__(current, "____conn__")
            if owner is conn or getattr(owner, "closed", True):
                installed = classic.INSTALLED[i] if classic.INSTALLED else None
                setattr(sys, name, installed or getattr(sys, f"__{name}__"))
        elif isinstance(current, classic.ConnectionStreams):
            current.set(conn, None)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class ComputeService(Service):
    """Compute endpoints only: what ``--no-classic`` (service-only mode) exposes."""

    _runtime: Runtime
    _protocol = ServerConnection

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._conn_id = 0
        self._client = "?"
        self._per_connection: dict[str, Any] = {}  # hosted objects with connection scope
        self._tasks: TaskEndpoint | None = None  # set by hello (rpycsvc clients)

    def __getattr__(self, name: str) -> Any:
        # conn.root.<name> for objects hosted with --service (exposed_<name> in service-only mode)
        hosted = self.__dict__.get("_runtime")
        key = name[8:] if name.startswith("exposed_") else name
        if hosted is not None and key in hosted.hosted:
            obj = hosted.hosted[key].get(self._per_connection)
            if type(obj).__module__ != "builtins":  # (a dict must not change every dict)
                hosted.service_types.add(type(obj))  # (set.add: atomic, no lock needed)
            return obj
        raise AttributeError(name)

    def exposed_redirect_output(self, fd: int, stream: Any) -> None:
        """Send this connection's classic-mode prints to ``stream`` (None: stop)."""
        from rpycsvc.protocol.classic import install

        if fd not in (1, 2):
            raise ValueError(f"fd must be 1 (stdout) or 2 (stderr); got {fd!r}")
        streams = install()[fd - 1]
        streams.set(self._conn_ref, stream)

    def exposed_queue(self, name: str, maxsize: int = 0) -> HostedQueue:
        """The server's shared queue ``name`` (created on first use)."""
        return self._runtime.queues.get(name, maxsize)

    def exposed_hosted(self) -> tuple[str, ...]:
        """Names of the objects hosted with ``--service``."""
        return tuple(sorted(self._runtime.hosted))

    def on_connect(self, conn: Any) -> None:
        super().on_connect(conn)
        self._conn_ref = conn
        self._conn_id = self._runtime.connected()
        try:
            peer = conn._config.get("endpoints", (None, None))[1]
            self._client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        except Exception:
            self._client = "?"

    def on_disconnect(self, conn: Any) -> None:
        self._runtime.heartbeat.remove(conn)
        self._runtime.disconnected()
        _forget_streams(conn)
        if self._tasks is not None:  # nobody is left to receive these results
            self._tasks.close()

    # -- rpycsvc clients ----------------------------------------------------------------------
    def exposed_hello(self, heartbeat: float | None = None,
                      modules: bool = False) -> tuple[tuple[str, Any], ...]:
        """An rpycsvc client says hello: from now on it may send task messages on this
        connection (see :mod:`rpycsvc.server.taskserver`). Returns server info as (key, value)
        pairs.

        With ``modules``, a task's import that can't find a module here asks the client for
        it (:mod:`rpycsvc.protocol.forwarding`); a service-only server forwards nothing.

        With ``heartbeat`` (seconds), the server sends an empty frame on this connection
        that often, from a thread of its own, so the client can tell a frozen server from a
        busy one (see :mod:`rpycsvc.protocol.liveness`); ``info["heartbeat"]`` is the interval
        granted.
        """
        conn = self._conn_ref
        if self._tasks is None:
            self._tasks = TaskEndpoint(self._runtime, conn, self._conn_id, self._client,
                                       modules=bool(modules))
            conn._channel.task_handler = self._tasks
        info = self._runtime.info()
        # (not with RPyC's experimental bind_threads: its frames carry thread ids)
        if heartbeat is not None and not getattr(conn, "_bind_threads", False):
            info["heartbeat"] = self._runtime.heartbeat.add(conn, float(heartbeat))
        info["endpoints"] = tuple(self._runtime.pool.endpoint_names)
        info["max_message"] = getattr(conn._channel, "max_message", None)
        info["max_held"] = MAX_HELD
        return tuple(info.items())

    def exposed_stats_frames(self) -> tuple[bytes, ...]:
        return dumps(self.exposed_stats(), "stats")

    # -- for every client, plain RPyC included --------------------------------------------------
    def exposed_stats(self) -> dict[str, Any]:
        """Host, versions, cores, workers, task counts, uptime, load, memory."""
        return self._runtime.stats()

    def exposed_running(self) -> tuple[bytes, ...]:
        return dumps(self._runtime.pool.running_tasks(), "running tasks")

    def exposed_recent_failures(self) -> tuple[bytes, ...]:
        """The pool's last failures, oldest first: (time, label, client, error) (for ``top``)."""
        return dumps(list(self._runtime.pool.recent_failures), "recent failures")

    def exposed_ping(self, data: Any = None) -> Any:
        return data

    def exposed_endpoints(self) -> tuple[str, ...]:
        return tuple(self._runtime.pool.endpoint_names)

    def exposed_compute(self, task: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``task`` (an endpoint name or ``"module:function"``) on a worker; wait for it.

        Arguments are fetched by value. Results that RPyC can send by value (numbers,
        strings, bytes, tuples of those) arrive as such; others arrive as netrefs, which
        ``rpyc.classic.obtain`` copies. rpycsvc.connect() gets everything by value.
        """
        if isinstance(task, netref.BaseNetref):
            raise TypeError(
                "a function object can't be sent by a plain RPyC client (it would run back on "
                "the client through netrefs). Pass 'module:function' or an endpoint name, or "
                "connect with rpycsvc.connect(host, port), which sends functions by value."
            )
        if not isinstance(task, str):
            raise TypeError(f"task must be an endpoint name or 'module:function'; got {task!r}")
        kind = "endpoint" if task in self._runtime.pool.endpoint_names else "path"
        if kind == "path" and not self._runtime.classic:
            raise PermissionError(
                f"service-only mode: {task!r} is not a registered endpoint of this server "
                f"(it has: {', '.join(self._runtime.pool.endpoint_names) or 'none'})"
            )
        value = (tuple(_by_value(a) for a in args), {k: _by_value(v) for k, v in kwargs.items()})
        if not self._runtime.classic:
            _check_plain(value)
        frames = dumps(value, "arguments")
        reply = Deferred()

        def on_done(t: Task, ok: bool, out: list[Any] | None, err: TaskError | None) -> None:
            if err is not None:
                reply.fail(err)
            elif ok:
                try:
                    reply.resolve(loads(out or [], "result", writable=False))
                except SerializationError as exc:
                    reply.fail(exc)
            else:
                reply.fail(load_exception(out or [], self._runtime.address))

        self._runtime.count_task("rpyc")
        self._runtime.pool.submit(Task(kind=kind, spec=task, frames=frames, on_done=on_done,
                                       owner=self._conn_id, label=task, client=self._client))
        return reply


class ClassicConnection(ServerConnection):
    """A classic-mode connection: RPyC's classic attribute rules for every object (what
    ``SlaveService`` sets: ``allow_all_attrs``, no ``exposed_`` lookup), except on the
    objects this server hosts for clients, whose classes use RPyC's service convention.

    Turning ``allow_exposed_attrs`` back on for the whole connection (RPyC's answer in
    #454) would make every attribute read try ``exposed_<name>`` first: a missing
    ``obj.foo`` silently returned ``obj.exposed_foo``, and a ``MagicMock`` grew an
    ``exposed_foo`` child on each read.
    """

    def _check_attr(self, obj: Any, name: str, perm: str) -> str:
        runtime = getattr(self._local_root, "_runtime", None)
        # type(), not isinstance(): a netref or a proxy must not be asked anything
        if runtime is not None and type(obj) in runtime.service_types \
                and self._config[perm] and not name.startswith("_"):
            exposed = "exposed_" + name  # RPyC's rule: the plain name wins if both exist
            if hasattr(type(obj), exposed) and not hasattr(obj, name):
                return exposed
        checked: str = super()._check_attr(obj, name, perm)
        return checked


class ClassicComputeService(ComputeService, SlaveService):
    """Compute endpoints plus RPyC classic access (``modules``, ``execute``, ``eval``).

    Registered as ``CLASSICCOMPUTE`` (its name, ``conn.root.get_service_name()``) and as
    ``SLAVE``, the name ``rpyc_classic`` servers register under, so
    ``rpyc.discover("SLAVE")`` finds it. The compute methods also have plain names
    (``compute``, ``stats``...; added below): classic access looks attributes up as is.
    """

    ALIASES = ("CLASSICCOMPUTE", "SLAVE")
    _protocol = ClassicConnection

    def __init__(self, runtime: Runtime) -> None:
        SlaveService.__init__(self)
        ComputeService.__init__(self, runtime)


def _plain_aliases(cls: type, base: type) -> None:
    """Give ``cls`` a plain name for each ``exposed_<name>`` method of ``base`` that has
    none yet (``get_service_name`` and the like already have theirs)."""
    for attr, value in vars(base).items():
        if attr.startswith("exposed_") and not hasattr(cls, attr[len("exposed_"):]):
            setattr(cls, attr[len("exposed_"):], value)


_plain_aliases(ClassicComputeService, ComputeService)


def _by_value(obj: Any, depth: int = 0) -> Any:
    """Copy a plain client's netref'd list/dict/set into a local object, element by element."""
    if not isinstance(obj, netref.BaseNetref):
        return obj
    if depth > 20:
        raise SerializationError("argument nested too deeply to fetch by value")
    cls = object.__getattribute__(obj, "____id_pack__")[0]
    if cls in ("builtins.list", "builtins.tuple", "builtins.set", "builtins.frozenset"):
        if len(obj) > MAX_NETREF_ITEMS:
            raise SerializationError(
                f"argument has {len(obj)} items: too many to fetch from a plain RPyC client one "
                "by one; send a tuple, or use rpycsvc.connect() which sends values in one go"
            )
        items = [_by_value(x, depth + 1) for x in obj]
        return {"builtins.list": list, "builtins.tuple": tuple, "builtins.set": set,
                "builtins.frozenset": frozenset}[cls](items)
    if cls == "builtins.dict":
        # Only "safe" attributes (__iter__, __getitem__): a plain rpyc.connect() client
        # refuses .items() and the like unless it allows all public attributes.
        return {_by_value(k, depth + 1): _by_value(obj[k], depth + 1) for k in obj}
    if cls == "builtins.bytearray":
        return _fetch_bytearray(obj)
    raise SerializationError(
        f"can't fetch an argument of type {cls} by value from a plain RPyC client; pass "
        "numbers, strings, bytes, tuples, lists or dicts, or use rpycsvc.connect()"
    )


def _fetch_bytearray(obj: Any) -> bytearray:
    """Copy a plain client's bytearray in one round trip, on every Python version.

    ``bytes(netref)`` can't be used: before 3.12 it iterates the netref (a round trip per
    byte), and from 3.12 on it calls the proxy's PEP 688 ``__buffer__``, which returns a
    netref instead of a memoryview (``TypeError``). ``repr`` is a request every RPyC
    client answers, whatever attributes it allows, and gives ``bytearray(b'...')``: a
    literal, parsed here without evaluating code. The type in a netref is what the client
    says it is, so anything but that exact form is refused.
    """
    import ast

    text = repr(obj)
    body = text[len("bytearray("):-1] if text.startswith("bytearray(b") and \
        text.endswith(")") else ""
    try:
        value = ast.literal_eval(body) if body[1:2] in ("'", '"') else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if not isinstance(value, bytes):
        raise SerializationError(
            f"the client's bytearray argument has an unexpected repr {text[:80]!r}; send "
            "bytes, or use rpycsvc.connect()")
    return bytearray(value)


def _check_plain(value: Any, depth: int = 0) -> None:
    """Service-only mode: arguments must be plain data, not arbitrary objects."""
    if depth > 50:
        raise SerializationError("argument nested too deeply")
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, bytearray)):
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _check_plain(v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
        return
    raise SerializationError(
        f"service-only mode accepts plain data arguments only; got {type(value).__name__}"
    )
