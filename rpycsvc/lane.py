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
from typing import TYPE_CHECKING, Any, Callable

from . import _wire
from .errors import RpycsvcError
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
                    return ("ok", frames, "lane") if control[2] else ("raised", frames)
                if op == "out":
                    client._on_output(key, control[2], control[3])
                elif op == "log":
                    client._on_output(key, 0, control[2])
                elif op == "cancelled" and control[1] == key:  # before it started
                    return ("error", "TaskCancelledError", "the task was cancelled")
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

    def _broken(self, exc: BaseException, key: int) -> LaneBroken:
        """Ask the server why the lane closed (it knows: timeout, cancel, a crash)."""
        if self.client.closed:
            return LaneBroken(f"connection to {self.client.address} was closed", fate=None)
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
