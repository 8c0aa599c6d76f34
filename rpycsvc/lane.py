"""A client's direct *lane* to one worker process of a server.

Through RPyC, a task makes two hops: client → server process → worker, and back. Each
hop costs a process wake-up, a few pickles and, for large data, copies (RPyC's brine
frames the whole message in memory). A lane removes the middle hop: the client opens a
second TCP connection to the server, runs the same handshake (versions, authkey) with a
lane token it got in the server's hello, and the server hands the connected socket to
one of its worker processes (``SCM_RIGHTS``). From then on the client sends a task
straight to that worker, which runs it and writes output lines and the result straight
back — plain length-prefixed frames (:mod:`rpycsvc._wire`), large buffers written from
and read into their own memory.

The server stays in charge: the worker tells it when a lane task starts and ends, so
the task is counted, shown by ``rpycsvc top``, stopped at its timeout, and the worker
takes no queued task meanwhile. If the lane breaks mid-task, the client asks the server
(over RPyC) what happened — timeout, cancel, crashed worker — and reports that.

A lane carries one task at a time. :class:`~rpycsvc.client.Client` uses it for a task
whenever it is free (the common case of one call at a time, and one task of a fan-out)
and RPyC for the rest. Lanes need a threaded server without TLS (a TLS session can't be
handed to another process) on a system with ``SCM_RIGHTS``; elsewhere every task takes
the RPyC path, which behaves the same, only slower.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import rpyc

from . import _wire
from .errors import RpycsvcError, ServerLostError
from .handshake import client_handshake
from .transport import tune_socket

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("rpycsvc.lane")

#: A reply as :func:`rpycsvc.client.decode_reply` reads it.
Reply = tuple[Any, ...]


class LaneBroken(RpycsvcError):
    """The lane closed before the task's reply; ``ran`` says whether the task started."""

    def __init__(self, message: str, *, fate: tuple[Any, ...] | None) -> None:
        super().__init__(message)
        self.fate = fate

    @property
    def ran(self) -> bool:
        return self.fate is None or self.fate[0] != "LaneClosed"


class Lane:
    """One open lane. Take it with :meth:`try_acquire`; release with :meth:`release`."""

    def __init__(self, client: Client, sock: socket.socket, lane_id: str, pid: int) -> None:
        self.client = client
        self.sock = sock
        self.id = lane_id
        self.worker_pid = pid
        self.key: int | None = None  # the task in flight
        self.broken = False
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._reader: threading.Thread | None = None

    @classmethod
    def open(cls, client: Client, dial: Callable[[], socket.socket], token: str, n: int,
             timeout: float) -> Lane:
        """Connect, handshake as lane ``<token>/<n>``, and wait for the worker's hello."""
        lane_id = f"{token}/{n}"
        sock = dial()
        try:
            tune_socket(sock)
            client_handshake(sock, address=client.address, authkey=client._authkey,
                             timeout=timeout, extra={"lane": lane_id})
            sock.settimeout(timeout)
            control, _ = _wire.recv_msg(sock)
            if control[0] != "lane-ready":  # the worker took it
                raise ConnectionError(f"unexpected first lane message {control[0]!r}")
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return cls(client, sock, lane_id, int(control[1]))

    # -- ownership -------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        if self.broken or not self._lock.acquire(blocking=False):
            return False
        if self.broken:
            self._lock.release()
            return False
        return True

    def release(self) -> None:
        self.key = None
        self._lock.release()

    # -- one task ----------------------------------------------------------------------------
    def send(self, key: int, kind: str, spec: Any, opts: dict[str, Any],
             frames: tuple[Any, ...]) -> None:
        """Send a task (the lane must be held). Raises ``OSError`` if the lane is gone;
        the worker then never ran it (a partial message is thrown away)."""
        self.key = key
        try:
            _wire.send_msg(self.sock, ("run", key, kind, spec, tuple(opts.items())), frames)
        except OSError:
            self.broken = True
            raise

    def receive(self, key: int) -> Reply:
        """Read the task's output and reply; raises :class:`LaneBroken` if the lane breaks."""
        client = self.client
        try:
            while True:
                control, frames = _wire.recv_msg(self.sock)
                op = control[0]
                if op == "done":
                    return ("ok" if control[2] else "raised", frames)
                if op == "out":
                    client._on_output(key, control[2], control[3])
                elif op == "log":
                    client._on_output(key, 0, control[2])
                elif op == "cancelled" and control[1] == key:  # before it started
                    return ("error", "TaskCancelledError", "the task was cancelled")
                elif op == "need-module":  # the task imports a module of ours (forwarding)
                    self._send_module(control)
                elif op == "lane-ready":  # moved to another worker (its first worker was busy)
                    self.worker_pid = int(control[1])
                elif op == "fail":  # the worker refused a message and hung up
                    self.broken = True
                    if control[1] == key:
                        return ("error", str(control[2]), str(control[3]))
                    # an earlier message of ours (never a task): this one was not read
                    raise LaneBroken(f"lane to {client.address} was refused: {control[3]}",
                                     fate=("LaneClosed", str(control[3])))
        except (EOFError, OSError) as exc:
            self.broken = True
            raise self._broken(exc, key) from exc

    def _send_module(self, control: tuple[Any, ...]) -> None:
        """Answer a worker's request for one of our modules (see rpycsvc.forwarding); the
        task waits for it, so it goes at once, from the thread reading the task's reply."""
        modules = self.client._forwarding
        name = control[2] if len(control) > 2 else None
        reply = modules.answer(name) if modules is not None else ("none", str(name))
        _wire.send_msg(self.sock, ("module", control[1], reply))

    def _broken(self, exc: BaseException, key: int) -> LaneBroken:
        """Ask the server why the lane closed (it knows: timeout, cancel, a crash)."""
        if self.client.closed:
            lost = self.client.lost  # e.g. declared lost by the liveness check: say why
            return LaneBroken(str(lost) if isinstance(lost, ServerLostError) else
                              f"connection to {self.client.address} was closed", fate=None)
        try:
            fate = self.client.conn.root.lane_fate(self.id)
            if fate and len(fate) > 2 and fate[2] is not None and fate[2] != key:
                fate = ("LaneClosed", f"an earlier task's: {fate[1]}")  # ours never ran
            fate = (str(fate[0]), str(fate[1])) if fate else None
        except Exception as err:  # the server itself is gone
            return LaneBroken(f"lost {self.client.address}: {type(err).__name__}: {err}",
                              fate=None)
        return LaneBroken(f"lane to {self.client.address} closed ({exc})", fate=fate)

    # -- futures: replies read by a thread of the lane ---------------------------------------
    def start(self, key: int, on_reply: Callable[[int, Reply | LaneBroken], None]) -> None:
        """Have the lane's reader thread receive ``key``'s reply, call ``on_reply(key,
        reply or LaneBroken)``, then release the lane."""
        if self._reader is None:
            self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                            name=f"rpycsvc-lane-{self.client.address}")
            self._reader.start()
        self._jobs.put((key, on_reply))

    def _read_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            key, on_reply = job
            result: Reply | LaneBroken
            try:
                result = self.receive(key)
            except LaneBroken as exc:
                result = exc
            self.release()
            try:
                on_reply(key, result)
            except Exception:
                log.exception("lane reply handler failed")

    def close(self) -> None:
        """Hang up; a task in flight gets :class:`LaneBroken`. Safe to call twice."""
        self.broken = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        self._jobs.put(None)


class LaneUser:
    """The lane part of :class:`~rpycsvc.client.Client` (a mixin sharing its state): which
    task takes the lane, opening and reopening it, and what a broken lane means for the
    task that was on it."""

    # The client's state this part uses (set up in Client.__init__).
    address: str
    conn: Any
    server_info: dict[str, Any]
    _dial: Callable[[], socket.socket] | None
    _lane: Lane | None
    _lane_n: int
    _lane_lock: threading.Lock
    _lane_backoff: tuple[float, float]
    lost_after: float | None
    _lock: threading.Lock
    _pending: dict[int, tuple[Callable[[str, Any], None], Any]]
    _keys: Any

    if TYPE_CHECKING:
        @property
        def closed(self) -> bool: ...
        def _submit(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    opts: dict[str, Any]) -> Any: ...
        def _wire_options(self, key: int,
                          opts: dict[str, Any]) -> tuple[dict[str, Any], str]: ...
        def _send_rpyc(self, key: int, kind: str, spec: Any, wire: dict[str, Any],
                       frames: tuple[Any, ...]) -> None: ...

    def _compute(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 opts: dict[str, Any]) -> Any:
        from .client import _ignore, _label, decode_reply, frames_of_call  # (a cycle)

        lane = self._take_lane(opts)
        if lane is None:
            return self._submit(task, args, kwargs, opts).result()
        # The lane's reply is read right here: no hand-over between threads.
        try:
            kind, spec, frames = frames_of_call(task, args, kwargs, copy=False)
        except BaseException:
            lane.release()
            raise
        key = next(self._keys)
        wire, mode = self._wire_options(key, {**opts, "label": _label(task, spec)})
        with self._lock:
            self._pending[key] = (_ignore, (mode, None))
        try:
            try:
                lane.send(key, kind, spec, wire, frames)
            except OSError:
                lane.release()
                with self._lock:
                    self._pending.pop(key, None)
                return self._submit(task, args, kwargs, opts).result()
            del frames
            try:
                reply = lane.receive(key)
            except LaneBroken as exc:
                lane.release()
                if exc.ran:
                    raise self._lane_error(exc) from None
                return self._submit(task, args, kwargs, opts).result()
            except BaseException:  # KeyboardInterrupt: stop the task, drop the lane
                self._abandon_lane(lane)
                raise
            lane.release()
        finally:
            with self._lock:
                self._pending.pop(key, None)
        ok, value = decode_reply(reply, self.address)
        if not ok:
            raise value
        return value

    def _take_lane(self, opts: dict[str, Any]) -> Lane | None:
        """The lane, held for one task, if this task may take it and it is free."""
        if self._dial is None or opts.get("mode", "process") != "process" or self.closed:
            return None
        lane = self._lane
        if lane is not None and lane.try_acquire():
            return lane
        if (lane is not None and not lane.broken) or not self._lane_lock.acquire(blocking=False):
            return None  # busy, or another thread is opening one
        try:
            if self._lane is not lane:  # replaced meanwhile
                return self._lane if self._lane is not None and self._lane.try_acquire() \
                    else None
            if lane is not None:
                lane.close()
            self._lane = None
            token = self.server_info.get("lane")
            not_before, wait = self._lane_backoff
            if not token or time.monotonic() < not_before:
                return None
            self._lane_n += 1
            try:
                # (a frozen server accepts but never answers: no longer than lost_after)
                new = Lane.open(self, self._dial, str(token),  # type: ignore[arg-type]
                                self._lane_n, timeout=min(10.0, self.lost_after or 10.0))
            except Exception as exc:  # refused or unreachable: RPyC carries tasks meanwhile
                wait = min(30.0, max(0.1, wait * 2))
                self._lane_backoff = (time.monotonic() + wait, wait)
                log.info("no lane to %s (%s: %s); tasks go through RPyC for %.1f s",
                         self.address, type(exc).__name__, exc, wait)
                return None
            self._lane_backoff = (0.0, 0.0)
            new.try_acquire()
            self._lane = new
            if self.closed:  # closed while we opened it
                new.close()
                return None
            return new
        finally:
            self._lane_lock.release()

    def _abandon_lane(self, lane: Lane) -> None:
        """Stop the lane's task on the server and hang up (the next task opens a new lane)."""
        try:
            rpyc.async_(self.conn.root.cancel_lane)(lane.id, lane.key)
        except Exception:
            pass
        lane.close()

    def _lane_error(self, exc: LaneBroken) -> BaseException:
        """What a task that ran on a lane that broke ends with (see :meth:`_on_lane_reply`)."""
        from .client import decode_reply  # (a cycle)

        if exc.fate is None:
            return ServerLostError(str(exc), address=self.address)
        return decode_reply(("error", *exc.fate), self.address)[1]

    def _on_lane_reply(self, key: int, reply: Any, job: tuple[Any, ...]) -> None:
        if isinstance(reply, LaneBroken):
            if not reply.ran:  # the worker never saw it: send it the other way
                with self._lock:
                    still = key in self._pending
                if still:
                    try:
                        self._send_rpyc(key, *job)
                    except ServerLostError:
                        pass  # _lose() failed it already
                return
            with self._lock:
                entry = self._pending.pop(key, None)
            if entry is not None:  # the same outcome _lane_error gives a compute() call
                if reply.fate is None:
                    entry[0]("lost", ServerLostError(str(reply), address=self.address))
                else:
                    entry[0]("reply", ("error", *reply.fate))
            return
        with self._lock:
            entry = self._pending.pop(key, None)
        if entry is not None:
            entry[0]("reply", reply)
