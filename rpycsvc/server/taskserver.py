"""The server's end of the task protocol: one :class:`TaskEndpoint` per rpycsvc client
connection, fed by its channel (see :mod:`rpycsvc.protocol.taskframes`).

Messages from the client::

    ("run", key, kind, spec, options) + frames   a task (kind/spec/frames: frames_of_call)
    ("cancel", key)                              stop it, queued or running (no answer)
    ("module", req, reply)                       the answer to a "need"

to the client::

    ("done", key, status, service_s) + frames    status "ok" (result) or "raised" (exception)
    ("error", key, type_name, text)              refused, timed out, crashed, too large ...
    ("out", key, fd, text)                       a line of the task's stdout (1) or stderr
                                                 (2), or a log record (0)
    ("need", req, key, name)                     task ``key`` imports ``name``: send it?

Everything runs on the pool, the server's only scheduler. Answers are queued on the
connection's writer thread (:func:`~rpycsvc.protocol.sending.send_task` with ``wait=False``): the
pool's reader, shared by every client, never waits for a slow one, and a task's output
always arrives before its result.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any, Callable, Protocol

from rpycsvc.errors import MessageTooLargeError, TaskError
from rpycsvc.protocol.limits import MESSAGE_OVERHEAD, too_large_message
from rpycsvc.protocol.sending import send_framed, send_task, unsent_bytes, when_unsent_below
from rpycsvc.protocol.serialization import check_plain
from rpycsvc.protocol.taskframes import parse_inline
from rpycsvc.server.config import check_timeout
from rpycsvc.server.pool import WorkerPool
from rpycsvc.server.task import Task

log = logging.getLogger("rpycsvc.server")

_KINDS = ("pickled", "path", "endpoint")
#: The most bytes of arguments one connection's unfinished tasks (queued or running) may
#: hold in the server, beyond its first such task (which may be as large as a message may
#: be). Clients learn it from hello (``max_held``) and wait before sending more, so a
#: client sending faster than the workers run holds memory on its own side, not here.
MAX_HELD = 256 << 20
#: The most bytes of results (and output) the server keeps for a connection whose client
#: does not read them (a frozen client, or one whose reader thread is stuck in a callback):
#: past this, none of its queued tasks starts until it has read half of them. Its running
#: tasks finish, and other clients' tasks go on. Without it, results nobody reads would
#: pile up in the server's memory until the kernel killed it, and every client with it.
MAX_UNREAD = 256 << 20


class Runtime(Protocol):
    """What a :class:`TaskEndpoint` needs of the server (``rpycsvc.server.service.Runtime``)."""

    pool: WorkerPool
    classic: bool

    def count_task(self, path: str, transport: str | None = None) -> None: ...


def transport_of(stream: Any) -> str:
    """``"tls"``, ``"tcp"`` or ``"ssh"`` (pipes or an ssh channel: a deployed server)."""
    sock = getattr(stream, "sock", None)
    if sock is None or not hasattr(sock, "family"):
        return "ssh"
    return "tls" if hasattr(sock, "getpeercert") else "tcp"


class TaskEndpoint:
    """Runs one connection's tasks on the pool and sends their answers back."""

    def __init__(self, runtime: Runtime, conn: Any, conn_id: int, client: str, *,
                 modules: bool) -> None:
        self._runtime = runtime
        self._conn = conn
        self._owner = conn_id
        self._client = client
        self._modules = modules and runtime.classic
        self.transport = transport_of(conn._channel.stream)
        #: the server's message limit (--max-message-size), for results as for arguments
        self._limit: int | None = getattr(conn._channel, "max_message", None)
        self._lock = threading.Lock()
        self._running: dict[int, int] = {}  # client's key -> pool task id
        #: bytes of arguments this connection's unfinished tasks hold here (see MAX_HELD)
        self._held = 0
        self._held_by: dict[int, int] = {}
        self._asks: dict[int, Callable[[Any], None]] = {}  # module request -> answer
        self._reqs = itertools.count(1)
        self._closed = False
        self._holding = False  # the pool holds our tasks: see MAX_UNREAD
        self._dropped: dict[int, int] = {}  # task -> characters of output dropped (MAX_UNREAD)

    # -- TaskHandler ----------------------------------------------------------------------------
    def on_task(self, control: tuple[Any, ...], frames: list[Any]) -> None:
        op = control[0]
        if op == "run":
            self._run(control, frames)
        elif op == "cancel" and len(control) == 2:
            with self._lock:
                task_id = self._running.get(control[1])
            if task_id is not None:
                self._runtime.pool.cancel(task_id)
        elif op == "module" and len(control) == 3:
            with self._lock:
                answer = self._asks.pop(control[1], None)
            if answer is not None:
                reply = control[2]
                answer(reply if isinstance(reply, tuple) else ("none", ""))
        else:
            log.warning("ignored a task message %r from %s", str(op)[:40], self._client)

    def on_small_task(self, control: tuple[Any, ...], inline: Any, size: int) -> None:
        """A ``run`` whose frames all came inline (see TaskHandler): its inline block goes
        to the worker as it came, not unpacked and framed again here. (Service-only mode
        checks the frames first: they are unpacked for that.)"""
        if not self._runtime.classic:
            self._run(control, parse_inline(inline)[2])
            return
        self._run(control, [inline], size)

    def on_task_refused(self, control: tuple[Any, ...], text: str) -> None:
        if control[0] == "run" and len(control) > 1:
            self._send(("error", control[1], "MessageTooLargeError", text))

    # -- tasks --------------------------------------------------------------------------------
    def _run(self, control: tuple[Any, ...], frames: list[Any],
             forwarded: int | None = None) -> None:
        """``forwarded``: ``frames`` is the client's inline block, holding this many bytes
        of frames (see on_small_task)."""
        key = control[1] if len(control) > 1 else None
        try:
            if len(control) != 5 or type(key) is not int:
                raise ValueError("a malformed run message")
            _, _, kind, spec, options = control
            if kind not in _KINDS:
                raise ValueError(f"unknown task kind {kind!r}")
            opts = dict(options)
            opts["timeout"] = check_timeout(opts.get("timeout"))
            opts["reply_key"] = key  # the worker frames a small result for us (see _done)
            runtime = self._runtime
            if not runtime.classic:
                if kind != "endpoint":
                    raise PermissionError(
                        "this server runs in service-only mode (--no-classic): it accepts no "
                        "functions or import paths from clients; call a registered endpoint "
                        f"by name (it has: {', '.join(runtime.pool.endpoint_names) or 'none'})")
                check_plain(frames)  # before any worker unpickles what the client sent
                opts.pop("fwd", None)  # service-only: no module forwarding
            task = Task(kind=kind, spec=spec, frames=tuple(frames),
                        on_done=lambda t, ok, out, err: self._done(key, t, ok, out, err),
                        owner=self._owner, mode=opts.get("mode", "process"),
                        timeout=opts["timeout"], options=opts,
                        on_output=(lambda fd, text: self._output(key, fd, text))
                        if opts.get("output", True) else None,
                        label=str(opts.get("label", spec if kind != "pickled" else "task")),
                        client=self._client,
                        on_module=(lambda name, answer: self._ask(key, name, answer))
                        if self._modules else None,
                        forwarded=forwarded is not None)
            size = forwarded if forwarded is not None else \
                sum(memoryview(f).nbytes for f in frames)
            with self._lock:
                if self._closed:
                    return
                if self._held and self._held + size > MAX_HELD:
                    # an rpycsvc client waits before sending this (it knows MAX_HELD from
                    # hello): only a client that doesn't gets here
                    raise MessageTooLargeError(
                        f"this connection's unfinished tasks hold {self._held} bytes of "
                        f"arguments in the server already; this task's {size} more would "
                        f"pass the limit of {MAX_HELD} bytes per connection: wait for some "
                        "results before sending more")
                # (booked before submit: a task that ends at once is unbooked by _done)
                self._running[key] = -1
                self._held += size
                self._held_by[key] = size
            runtime.count_task("task", self.transport)
            task_id = runtime.pool.submit(task)
            with self._lock:
                if self._running.get(key) == -1:
                    self._running[key] = task_id
        except Exception as exc:
            # a refusal (service-only mode, bad options, shutting down) fails this task alone
            if key is not None:
                with self._lock:
                    self._running.pop(key, None)
                    self._held -= self._held_by.pop(key, 0)
            self._send(("error", key, type(exc).__name__, str(exc)))

    def _done(self, key: int, task: Task, ok: bool, out: list[Any] | None,
              err: TaskError | None) -> None:
        with self._lock:
            self._running.pop(key, None)
            self._held -= self._held_by.pop(key, 0)
        self._say_dropped(key)
        if err is not None:
            self._send(("error", key, type(err).__name__, str(err)))
            return
        frames = out or ()
        limit = self._limit
        if task.framed is not None:
            size = task.framed
        else:
            size = sum(memoryview(f).nbytes for f in frames) if limit is not None else 0
        if limit is not None and size > limit - MESSAGE_OVERHEAD:
            # the server's limit holds both ways: this task fails alone, nothing is sent
            self._send(("error", key, "MessageTooLargeError", too_large_message(
                "result" if ok else "exception", size, limit)))
            return
        if task.framed is not None and out:  # the worker framed the whole message: relay it
            if not self._conn.closed:
                try:
                    send_framed(self._conn, out[0])
                except Exception:  # the connection is going: its reader cleans up
                    log.debug("could not queue a result for %s", self._client, exc_info=True)
        else:
            self._send(("done", key, "ok" if ok else "raised", task.service_s), frames)
        self._hold_if_unread()

    def _hold_if_unread(self) -> None:
        """If our client has left more than MAX_UNREAD bytes unread, start none of its
        queued tasks until it has read half of them. (The pool's hold and release are made
        under our lock, so a close() can't come between our flag and the pool's.)"""
        if self._holding or unsent_bytes(self._conn) <= MAX_UNREAD:
            return
        pool = self._runtime.pool
        with self._lock:
            if self._holding or self._closed:
                return
            self._holding = True
            pool.hold(self._owner)
        log.warning("%s does not read its results (%d MiB wait to be sent): its queued tasks "
                    "wait until it reads them", self._client, unsent_bytes(self._conn) >> 20)
        when_unsent_below(self._conn, MAX_UNREAD // 2, self._release)

    def _release(self) -> None:
        pool = self._runtime.pool
        with self._lock:
            if not self._holding:
                return
            self._holding = False
            pool.release(self._owner)
        pool.dispatch()

    def _output(self, key: int, fd: int, text: Any) -> None:
        """A task's output (or log record) for the client. Unlike results, output a client
        doesn't read is dropped past twice MAX_UNREAD (a task printing in a loop would
        otherwise fill the server's memory); a line says how much, once it reads again."""
        if self._holding and unsent_bytes(self._conn) > 2 * MAX_UNREAD:
            with self._lock:
                self._dropped[key] = self._dropped.get(key, 0) + len(text)
            return
        self._say_dropped(key)
        self._send(("out", key, fd, text))
        self._hold_if_unread()

    def _say_dropped(self, key: int) -> None:
        """Tell the client how much of task ``key``'s output was dropped, if any."""
        if not self._dropped:
            return
        with self._lock:
            dropped = self._dropped.pop(key, 0)
        if dropped:
            self._send(("out", key, 2, f"[rpycsvc: {dropped} characters of this task's "
                        "output were dropped: its client left too much output and results "
                        "unread]\n"))

    def _ask(self, key: int, name: str, answer: Callable[[Any], None]) -> None:
        """Ask the client for module ``name`` (rpycsvc.protocol.forwarding); the worker bounds how
        long it waits for the answer."""
        req = next(self._reqs)
        with self._lock:
            if len(self._asks) > 1000:  # answers that never came: forget the oldest
                self._asks.pop(next(iter(self._asks)))
            self._asks[req] = answer
        self._send(("need", req, key, name))

    def _send(self, control: tuple[Any, ...], frames: Any = ()) -> None:
        if self._conn.closed:
            return
        try:  # (frames are the worker's answer, read into buffers nobody else holds)
            send_task(self._conn, control, frames, wait=False, owned=True)
        except Exception:  # the connection is going: its reader cleans up
            log.debug("could not queue %r for %s", control[0], self._client, exc_info=True)

    def close(self) -> None:
        """The connection is gone: stop its tasks (nobody is left to receive results)."""
        with self._lock:
            self._closed = True
            running = [t for t in self._running.values() if t != -1]
            self._running.clear()
            self._held_by.clear()
            self._held = 0
            self._asks.clear()
            if self._holding:  # (its queued tasks are cancelled below: nothing to dispatch)
                self._holding = False
                self._runtime.pool.release(self._owner)
        for task_id in running:
            self._runtime.pool.cancel(task_id, "cancel")
