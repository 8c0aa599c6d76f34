"""One connection to one rpycsvc server: run tasks by value, classic access, live output.

:func:`~rpycsvc.client.connect.connect` returns a :class:`Client`, opened by
:func:`~rpycsvc.client.opening.connect_stream` over an open stream.
``client.root.compute(fn, *args)`` and ``client.submit(fn, *args)`` send the function and
its arguments by value (cloudpickle, pickle protocol 5) and get results by value; many
tasks may be in flight on one connection.
``client.modules``/``execute``/``eval`` are RPyC's classic access, unchanged.

Tasks travel as task messages on the same connection (:mod:`rpycsvc.protocol.taskframes`), not
as RPyC calls: one protocol on every transport (TCP, TLS, the pipes of an ssh session),
in order with the connection's RPyC messages; the server relays them to its worker pool
(:mod:`rpycsvc.server.taskserver`). The connection's reader thread reads the answers.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from typing import Any, Callable

from rpycsvc.client.calls import frames_of_call, settle_reply
from rpycsvc.client.environment import for_client
from rpycsvc.client.future import TaskFuture, settle
from rpycsvc.client.html import client_html
from rpycsvc.client.output import OutputRouter
from rpycsvc.client.taskoptions import check_options
from rpycsvc.errors import ServerLostError
from rpycsvc.protocol import module_provider
from rpycsvc.protocol.limits import MESSAGE_OVERHEAD, oversize
from rpycsvc.protocol.liveness import WATCHDOG, ClientConnection
from rpycsvc.protocol.module_provider import ModuleProvider
from rpycsvc.protocol.sending import send_task
from rpycsvc.protocol.serialization import loads

log = logging.getLogger("rpycsvc.client")
#: ``on`` in the threads that read clients' connections, and while a thread handles a
#: task message (see Client.start_task)
_READER = threading.local()


class _Root:
    """``client.root``: ``compute``/``stats`` by value, anything else from the server's root."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def compute(self, task: Any, *args: Any, **kwargs: Any) -> Any:
        return self._client.compute(task, *args, **kwargs)

    def stats(self) -> dict[str, Any]:
        return self._client.stats()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client.conn.root, name)

    def __dir__(self) -> list[str]:
        return sorted({"compute", "stats", *dir(self._client.conn.root)})


class Client:
    """A connection to one rpycsvc server. Create with :func:`connect`; close when done."""

    def __init__(self, conn: Any, hello: dict[str, Any], address: str, output: OutputRouter,
                 options: dict[str, Any] | None = None, lost_after: float | None = None,
                 modules: ModuleProvider | None = None,
                 module_gate: module_provider.ConnectionModules | None = None) -> None:
        self.conn = conn
        #: our project's modules, offered to the server's imports (rpycsvc.protocol.forwarding);
        #: None: off. The gate answers the server's requests for them.
        self._forwarding = modules
        self._module_gate = module_gate
        self.address = address
        self.server_info = hello
        self.output = output
        #: the server's Python/cloudpickle versions and the checks they call for (per task)
        self.environment = for_client(self)
        self._defaults = dict(options or {})
        self._keys = itertools.count(1)
        self._pending: dict[int, tuple[Callable[[str, Any], None], Any]] = {}
        #: bytes of arguments our unfinished tasks hold in the server, by key: past the
        #: server's ``max_held`` a new task waits for room (the server's memory is bounded)
        self._held = 0
        self._held_by: dict[int, int] = {}
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._closed = False
        self.lost: BaseException | None = None
        self._lost_callbacks: list[Callable[[Client, BaseException], None]] = []
        self.root = _Root(self)
        # the server's answers to our tasks arrive on this connection (rpycsvc.protocol.taskframes)
        conn._channel.task_handler = self
        #: seconds of silence after which the server is declared lost (None: never); only
        #: when the server agreed to send heartbeats (see rpycsvc.protocol.liveness)
        self.lost_after = lost_after if hello.get("heartbeat") else None
        self._reader = threading.Thread(target=self._serve, name=f"rpycsvc-client-{address}",
                                        daemon=True)
        self._reader.start()
        if self.lost_after is not None and isinstance(conn, ClientConnection):
            WATCHDOG.watch(conn, self.lost_after, self._server_silent)

    # -- classic access ------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in ("modules", "execute", "eval", "namespace", "builtins", "teleport"):
            if not self.server_info.get("classic", True):
                raise AttributeError(
                    f"{self.address} runs in service-only mode (--no-classic): no {name}"
                )
            return getattr(self.conn, name)
        raise AttributeError(name)

    @property
    def workers(self) -> int:
        """How many tasks the server runs at once in process mode."""
        return int(self.server_info.get("workers", 1))

    @property
    def threads(self) -> int:
        """How many thread-mode tasks the server runs at once."""
        return int(self.server_info.get("threads", 0))

    # -- tasks -----------------------------------------------------------------------------------
    def options(self, **opts: Any) -> _Options:
        """A view that runs tasks with ``timeout`` (seconds, enforced on the server),
        ``mode`` (``"process"``, default, or ``"thread"`` for I/O-bound tasks) and
        ``output`` (``"stream"``, ``"capture"`` or ``"discard"``)."""
        return _Options(self, check_options(opts))

    def submit(self, task: Any, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Start ``task(*args, **kwargs)`` on the server; returns a future at once."""
        return self._submit(task, args, kwargs, self._defaults)

    def compute(self, task: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``task(*args, **kwargs)`` on the server and return its result (by value).

        ``task`` is a function (sent by value), ``"module:function"`` or an endpoint name.
        """
        return self._compute(task, args, kwargs, self._defaults)

    def _compute(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 opts: dict[str, Any]) -> Any:
        fut = self._submit(task, args, kwargs, opts)
        try:
            return fut.result()
        except KeyboardInterrupt:  # Ctrl-C while waiting stops the task on the server too
            fut.stop()
            raise

    def _submit(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                opts: dict[str, Any]) -> TaskFuture:
        fut = TaskFuture()
        fut.address = self.address
        kind, spec, frames = frames_of_call(task, args, kwargs, copy=False)
        label = _label(task, spec)

        def done(status: str, value: Any) -> None:
            if status == "lost":
                settle(fut, None, value)
            else:
                settle_reply(fut, value, self.address)

        # Sent at once: running from the start (set before a reply can settle it).
        fut.set_running_or_notify_cancel()
        key = self.start_task(kind, spec, {**opts, "label": label}, frames, done, fut)
        fut._stopper = lambda: self.cancel_task(key)
        return fut

    def start_task(self, kind: str, spec: Any, opts: dict[str, Any], frames: tuple[Any, ...],
                   done: Callable[[str, Any], None], sink: Any = None) -> int:
        """Low level: send one task; ``done(status, reply)`` runs once in the reader thread
        (status ``"reply"`` with the raw reply — ``("ok", frames, service_s)``,
        ``("raised", frames, service_s)`` or ``("error", name, text)`` — or ``"lost"`` with
        the exception). Returns once the task is written: ``frames`` may change after."""
        self.environment.check_task(kind, spec, frames)  # may refuse: EnvironmentMismatchError
        key = next(self._keys)
        wire, mode = self._wire_options(opts)
        size = sum(memoryview(f).nbytes for f in frames)
        max_message = self.server_info.get("max_message")
        too_large = None if (type(max_message) is int and size + len(spec or "")
                             + MESSAGE_OVERHEAD <= max_message) \
            else oversize((spec, frames), max_message)  # (the exact check: near the limit)
        limit = self.server_info.get("max_held")
        with self._lock:
            if too_large is None and limit and not getattr(_READER, "on", False):
                # (not in a reader thread, which must not wait: a cluster's dispatch from a
                # callback sends within its own small window anyway)
                while self._held and self._held + size > limit and self.lost is None \
                        and not self._closed:
                    self._room.wait(1.0)
            if self.lost is not None:
                raise ServerLostError(f"connection to {self.address} is lost: {self.lost}",
                                      address=self.address)
            if too_large is None:
                self._pending[key] = (done, (mode, sink))
                self._held += size
                self._held_by[key] = size
        if too_large is not None:  # fails alone, like a refusal from the server
            done("reply", ("error", "MessageTooLargeError", too_large))
            return key
        try:
            # In a reader thread (a future's callback, a cluster dispatching its next job
            # when a result arrives) we must not block: a server that doesn't read would
            # stop this connection's own results and heartbeats. Queue it there instead.
            send_task(self.conn, ("run", key, kind, spec, wire), frames,
                      wait=not getattr(_READER, "on", False))
        except (EOFError, OSError) as exc:
            self._take_pending(key)  # reported by raising, not also through done()
            lost = self.lost
            if isinstance(lost, ServerLostError):
                raise lost from exc
            self._lose(exc)
            raise ServerLostError(f"connection to {self.address} is lost: {exc}",
                                  address=self.address) from exc
        return key

    def _wire_options(self, opts: dict[str, Any]) -> tuple[tuple[tuple[str, Any], ...], str]:
        """The options as the worker reads them, and where the task's output goes here."""
        wire = dict(opts)
        mode = wire.pop("output", None) or self.output.mode
        wire["output"] = mode != "discard"
        wire["logging"] = self.output.forward_logging
        if self._forwarding is not None:  # our token and the digests of modules forwarded
            wire["fwd"] = self._forwarding.option()
        return tuple(wire.items()), mode

    def cancel_task(self, key: int) -> None:
        """Ask the server to stop this connection's task ``key`` wherever it is (dequeued,
        or its worker killed); never waits (queued for the connection's writer)."""
        if self.lost is None and not self._closed:
            try:
                send_task(self.conn, ("cancel", key), wait=False)
            except (EOFError, OSError):
                pass

    # -- the server's task messages (protocol.taskframes.TaskHandler; the reader thread) ----
    def on_task(self, control: tuple[Any, ...], frames: list[Any]) -> None:
        outer = getattr(_READER, "on", False)
        _READER.on = True  # callbacks run from here must not block (see start_task)
        try:
            self._on_task(control, frames)
        finally:
            _READER.on = outer

    def _on_task(self, control: tuple[Any, ...], frames: list[Any]) -> None:
        op = control[0]
        if op == "done":
            _, key, status, service_s = control
            entry = self._take_pending(key)
            if entry is not None:
                entry[0]("reply", (status, frames, service_s))
        elif op == "out":
            _, key, fd, text = control
            self._on_output(key, fd, text)
        elif op == "error":
            _, key, name, text = control
            entry = self._take_pending(key)
            if entry is not None:
                entry[0]("reply", ("error", name, text))
        elif op == "need":
            _, req, _key, name = control
            gate = self._module_gate
            reply = gate.answer(name) if gate is not None else (
                "error", str(name), "this client forwards no modules (forward_modules=False)")
            try:
                send_task(self.conn, ("module", req, reply), wait=False)
            except (EOFError, OSError):
                pass
        else:
            log.warning("ignored a task message %r from %s", str(op)[:40], self.address)

    def on_task_refused(self, control: tuple[Any, ...], text: str) -> None:
        if control[0] == "done":
            entry = self._take_pending(control[1])
            if entry is not None:
                entry[0]("reply", ("error", "MessageTooLargeError", text))

    def _take_pending(self, key: Any) -> tuple[Callable[[str, Any], None], Any] | None:
        """Forget task ``key`` (answered, refused or never sent): its entry, or None."""
        with self._lock:
            entry = self._pending.pop(key, None)
            size = self._held_by.pop(key, 0)
            if size:
                self._held -= size
                self._room.notify_all()
        return entry

    def _on_output(self, key: int, fd: int, text: Any) -> None:
        entry = self._pending.get(key)
        if entry is None:
            return
        mode, sink = entry[1]
        if fd == 0:
            self.output.log(self.address, key, text)
        else:
            self.output.emit(self.address, key, fd, text, mode, sink)

    # -- plumbing -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The server's stats as a plain dict (host, versions, workers, task counts...)."""
        stats: dict[str, Any] = loads(self.conn.root.stats_frames(), "stats")
        return stats

    def ping(self) -> None:
        """One round trip to the server."""
        self.conn.root.ping()

    def on_lost(self, callback: Callable[[Client, BaseException], None]) -> None:
        """Call ``callback(client, exc)`` once if the connection dies."""
        self._lost_callbacks.append(callback)

    def _serve(self) -> None:
        _READER.on = True
        try:
            while not self._closed and self.lost is None:  # (lost: declared by the watchdog)
                try:
                    self.conn.serve(1.0)
                except (EOFError, OSError):
                    raise
                except Exception:  # a bug in a callback must not kill the connection
                    log.exception("error while handling a message from %s", self.address)
        except BaseException as exc:  # EOFError, OSError, or anything RPyC raises
            if not self._closed:
                self._lose(exc)
                return
        if self.lost is not None:
            return
        self._lose(ServerLostError(f"connection to {self.address} was closed",
                                   address=self.address))

    def _server_silent(self, silence: float) -> None:
        """The watchdog heard nothing from the server for longer than ``lost_after``."""
        err = ServerLostError(
            f"{self.address} sent nothing for {silence:.1f} s (lost_after={self.lost_after:g}):"
            " declared lost (the server is frozen or paused, or the network to it is down)",
            address=self.address)
        log.warning("%s", err)
        conn = self.conn
        # (woken after the loss is booked: the reader thread then reads EOF, and must not
        # report that as the cause)
        self._lose(err, wake=conn.mark_lost if isinstance(conn, ClientConnection) else None)

    def _lose(self, exc: BaseException,
              wake: Callable[[ServerLostError], None] | None = None) -> None:
        """Book the connection as lost (once) and fail what was in flight on it; ``wake``
        (with the error) runs first after booking, to wake threads blocked on it."""
        with self._lock:
            if self.lost is not None:
                return
            self.lost = exc
            pending = list(self._pending.values())
            self._pending.clear()
            self._held_by.clear()
            self._held = 0
            self._room.notify_all()
        if wake is not None and isinstance(exc, ServerLostError):
            wake(exc)
        err = exc if isinstance(exc, ServerLostError) else ServerLostError(
            f"lost the connection to {self.address} ({type(exc).__name__}: {exc})",
            address=self.address)
        for done, _ in pending:
            try:
                done("lost", err)
            except Exception:
                pass
        for cb in self._lost_callbacks:
            try:
                cb(self, err)
            except Exception:
                pass

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection; tasks still in flight fail with ``ServerLostError``."""
        if self._closed:
            return
        self._closed = True
        if isinstance(self.conn, ClientConnection):
            WATCHDOG.unwatch(self.conn)
        try:
            self.conn._channel.stream.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError, EOFError):  # EOFError: rpyc's ClosedFile
            pass
        try:
            self.conn.close()
        except Exception:
            pass
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)
        self._lose(ServerLostError(f"connection to {self.address} was closed",
                                   address=self.address))

    @property
    def closed(self) -> bool:
        return self._closed or self.lost is not None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<rpycsvc.Client {self.address} {state}>"

    def _repr_html_(self) -> str:
        """The connection as Jupyter shows it: the server, its workers, tasks running/done."""
        return client_html(self)


class _Options:
    """``client.options(timeout=...)``: the same calls, with these task options."""

    def __init__(self, client: Client, opts: dict[str, Any]) -> None:
        self._client = client
        self._opts = {**client._defaults, **opts}

    def submit(self, task: Any, /, *args: Any, **kwargs: Any) -> TaskFuture:
        return self._client._submit(task, args, kwargs, self._opts)

    def compute(self, task: Any, *args: Any, **kwargs: Any) -> Any:
        return self._client._compute(task, args, kwargs, self._opts)


def _label(task: Any, spec: Any) -> str:
    return str(spec) if spec else getattr(task, "__qualname__", "task")
