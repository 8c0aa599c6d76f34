"""What the server exposes over RPyC: compute endpoints, stats, and classic module access.

``exposed_run`` is the by-value path the rpycsvc client uses: pickled frames in, pickled
frames out, answered through a :class:`~rpycsvc.transport.Deferred` so one connection can
have many tasks in flight. ``exposed_compute`` serves plain RPyC clients: import paths and
endpoint names, with arguments fetched by value. With ``classic`` on, the same connection
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
import secrets
import socket
import threading
import time
from typing import Any, Callable

import rpyc
from rpyc.core import netref
from rpyc.core.service import Service, SlaveService

from .config import check_timeout
from .errors import SerializationError, TaskError
from .hosted import HostedQueue, HostedSpec, QueueRegistry
from .liveness import Heartbeat
from .pool import Task, WorkerPool
from .serialization import check_plain, dumps, loads
from .tracebacks import load_exception
from .transport import Deferred, ServerConnection

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
        #: set by the server when clients may open lanes (threaded mode, no TLS)
        self.lanes = False
        #: lane token → (connection id, client address) of the connection it was issued to
        self.lane_tokens: dict[str, tuple[int, str]] = {}
        #: beats on the connections of clients that asked for it in hello (liveness)
        self.heartbeat = Heartbeat()
        #: classes of the objects hosted for clients (queues, ``--service`` objects): their
        #: ``exposed_<name>`` methods answer to ``<name>`` on classic connections too
        self.service_types: set[type] = {HostedQueue}

    def attach_lane(self, sock: socket.socket, lane_id: str) -> None:
        """Hand a client's lane socket (after its handshake) to a worker process.

        ``lane_id`` is ``"<token>/<n>"``; the token must be one this server issued to a
        connection still open. Raises ``PermissionError``/``ConfigError`` to refuse.
        """
        owner = self.lane_tokens.get(lane_id.split("/", 1)[0]) if self.lanes else None
        if owner is None:
            raise PermissionError("unknown or expired lane token")
        fd = sock.detach()
        try:
            self.pool.attach_lane(fd, lane_id, owner=owner[0], client=owner[1],
                                  restricted=not self.classic)
        finally:
            os.close(fd)

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
        from . import handshake

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
        }


def _forget_streams(conn: Any) -> None:
    """Drop this connection's redirects; undo its ``conn.modules.sys.stdout = ...``."""
    import sys

    from . import classic

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
        self._sink: Any = None
        self._running: dict[Any, int] = {}
        self._lock = threading.Lock()
        self._per_connection: dict[str, Any] = {}  # hosted objects with connection scope
        self._lane_token = ""
        self._modules: Any = None  # the client's module provider (rpycsvc.forwarding)

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
        from .classic import install

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
        if self._lane_token:
            self._runtime.lane_tokens.pop(self._lane_token, None)
            self._runtime.pool.drop_owner_lanes(self._conn_id)
        _forget_streams(conn)
        with self._lock:
            running = list(self._running.values())
            self._running.clear()
        for task_id in running:  # nobody is left to receive these results
            self._runtime.pool.cancel(task_id, "cancel")

    # -- the rpycsvc client's by-value path ---------------------------------------------------
    def exposed_hello(self, sink: Any = None, heartbeat: float | None = None,
                      modules: Any = None) -> tuple[tuple[str, Any], ...]:
        """Register the client's output sink; returns server info as (key, value) pairs.

        ``modules`` is the client's module provider (its ``answer``, see
        :mod:`rpycsvc.forwarding`): asked for a module a task's import can't find here.
        A service-only server keeps none (it forwards nothing).

        With ``heartbeat`` (seconds), the server sends an empty frame on this connection
        that often, from a thread of its own, so the client can tell a frozen server from a
        busy one (see :mod:`rpycsvc.liveness`); ``info["heartbeat"]`` is the interval granted.
        """
        self._sink = rpyc.async_(sink) if sink is not None else None
        self._modules = rpyc.async_(modules) if modules is not None \
            and self._runtime.classic else None
        info = self._runtime.info()
        # (not with RPyC's experimental bind_threads: its frames carry thread ids)
        if heartbeat is not None and not getattr(self._conn_ref, "_bind_threads", False):
            info["heartbeat"] = self._runtime.heartbeat.add(self._conn_ref, float(heartbeat))
        info["endpoints"] = tuple(self._runtime.pool.endpoint_names)
        if self._runtime.lanes:
            if not self._lane_token:
                self._lane_token = secrets.token_hex(16)
                self._runtime.lane_tokens[self._lane_token] = (self._conn_id, self._client)
            info["lane"] = self._lane_token
        return tuple(info.items())

    def _own_lane(self, lane_id: str) -> bool:
        return bool(self._lane_token) and str(lane_id).split("/", 1)[0] == self._lane_token

    def exposed_lane_fate(self, lane_id: str, timeout: float = 5.0) -> tuple[Any, ...] | None:
        """Why this connection's lane ``lane_id`` broke: ``(error name, text, key of the
        task it concerns or None)``, or None."""
        if not self._own_lane(lane_id):
            return None
        return self._runtime.pool.lane_fate(str(lane_id), min(float(timeout), 30.0))

    def exposed_cancel_lane(self, lane_id: str, key: int | None = None) -> bool:
        """Stop task ``key`` (None: whichever runs) of this connection's lane ``lane_id``."""
        return self._own_lane(lane_id) and self._runtime.pool.cancel_lane(
            str(lane_id), self._conn_id, int(key) if key is not None else None)

    def exposed_run(self, kind: str, spec: Any, options: tuple[tuple[str, Any], ...],
                    frames: tuple[bytes, ...]) -> Deferred:
        """Run one task (or a batch); replies ``("ok", frames)``, ``("raised", exc_frames)``
        or ``("error", kind, message)`` when it finishes."""
        try:
            return self._start_run(kind, spec, options, frames)
        except Exception as exc:
            # A refusal (service-only mode, bad arguments, shutting down) is an ("error", ...)
            # reply like any failure found later: the client calls run() asynchronously, and
            # an exception reply would be raised in its reader thread, not in the caller.
            reply = Deferred()
            reply.resolve(("error", type(exc).__name__, str(exc)))
            return reply

    def _start_run(self, kind: str, spec: Any, options: tuple[tuple[str, Any], ...],
                   frames: tuple[bytes, ...]) -> Deferred:
        opts = dict(options)
        opts["timeout"] = check_timeout(opts.get("timeout"))
        if not self._runtime.classic:
            if kind != "endpoint":
                raise PermissionError(
                    "this server runs in service-only mode (--no-classic): it accepts no "
                    "functions or import paths from clients; call a registered endpoint by "
                    f"name (it has: {', '.join(self._runtime.pool.endpoint_names) or 'none'})"
                )
            check_plain(frames)  # before any worker unpickles what the client sent
            opts.pop("fwd", None)  # service-only: no module forwarding
        key = opts.pop("key", None)
        reply = Deferred()
        sink = self._sink if opts.get("output", True) else None

        def on_output(fd: int, text: Any) -> None:
            if sink is not None:
                try:
                    sink(key, fd, text)
                except Exception:
                    pass

        def on_done(task: Task, ok: bool, out: list[Any] | None, err: TaskError | None) -> None:
            with self._lock:
                self._running.pop(key, None)
            if err is not None:
                reply.resolve(("error", type(err).__name__, str(err)))
            elif ok:
                reply.resolve(("ok", tuple(bytes(f) for f in out or ())))
            else:
                reply.resolve(("raised", tuple(bytes(f) for f in out or ())))

        task = Task(kind=kind, spec=spec, frames=tuple(frames), on_done=on_done,
                    owner=self._conn_id, mode=opts.get("mode", "process"),
                    timeout=opts.get("timeout"), options=opts, on_output=on_output,
                    label=str(opts.get("label", spec if kind != "pickled" else "task")),
                    client=self._client,
                    on_module=self._ask_module if self._modules is not None else None)
        task_id = self._runtime.pool.submit(task)
        if key is not None and task.state != "done":
            with self._lock:
                self._running[key] = task_id
        return reply

    def _ask_module(self, name: str, answer: Callable[[Any], None]) -> None:
        """Ask the client for module ``name`` (rpycsvc.forwarding) without waiting: its
        reply goes to ``answer`` (the worker bounds how long it waits for it)."""
        from .forwarding import FETCH_TIMEOUT

        res = self._modules(name)
        res.set_expiry(FETCH_TIMEOUT)

        def done(r: Any) -> None:
            try:
                reply = r.value
            except Exception as exc:
                reply = ("error", name, f"the client failed to send module {name!r}: "
                         f"{type(exc).__name__}: {str(exc)[:300]}")
            answer(reply if isinstance(reply, tuple) else ("none", name))

        res.add_callback(done)

    def exposed_cancel(self, key: Any) -> bool:
        """Cancel this connection's task ``key``: dequeue it, or stop it if running."""
        with self._lock:
            task_id = self._running.get(key)
        return task_id is not None and self._runtime.pool.cancel(task_id)

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
