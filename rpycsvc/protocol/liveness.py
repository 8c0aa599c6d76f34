"""Liveness: a frozen server (SIGSTOP, a paused VM, a link dead without a RST) must not hang
its clients, and a long classic call must not be mistaken for one.

RPyC serves one request at a time per connection, so a ping from the client waits behind a
long classic call (``c.modules.time.sleep(60)``) and can't tell "busy" from "frozen". So the
*server* speaks: a :class:`Heartbeat` thread of its own writes an empty frame on every
connection whose client asked for it in ``hello``, every ``interval`` seconds, whatever the
connection's thread is doing. An empty frame is a valid RPyC frame that carries no message:
RPyC's ``serve()`` reads it as "nothing arrived", so nothing answers it and nothing piles up
behind a busy connection. Plain RPyC clients never ask, and get nothing new.

On the client, :class:`ClientConnection` waits for a classic call as long as it takes (RPyC's
30 s ``sync_request_timeout`` does not apply) and :class:`Watchdog` (one thread per process)
checks every watched connection: when no byte has arrived for ``lost_after`` seconds and none
is waiting to be read, the server is declared lost — see :meth:`ClientConnection.mark_lost`
for how every waiting thread is woken with :class:`~rpycsvc.errors.ServerLostError`.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
import weakref
from typing import Any, Callable

from rpyc.core import consts, vinegar
from rpyc.core.protocol import Connection
from rpyc.core.service import ClassicClient, VoidService

from rpycsvc.errors import RpycsvcTimeoutError, ServerLostError
from rpycsvc.protocol.channel import FastChannel
from rpycsvc.protocol.rpyc_connection import SendRaceSafe
from rpycsvc.protocol.sending import flush_queue, out_fd

log = logging.getLogger("rpycsvc.liveness")

#: How long a server may stay silent before its clients declare it lost (``lost_after``).
DEFAULT_LOST_AFTER = 10.0
#: The shortest heartbeat interval a server grants (a client can't make it spin).
MIN_INTERVAL = 0.1
#: The longest: beyond this a client's ``lost_after`` is needlessly slow to trip.
MAX_INTERVAL = 5.0
#: How long closing a connection waits for the server's goodbye.
CLOSE_WAIT = 5.0


def heartbeat_interval(lost_after: float) -> float:
    """The heartbeat a client with this ``lost_after`` asks for: several beats per bound."""
    return max(MIN_INTERVAL, min(1.0, lost_after / 4))


def check_lost_after(value: Any) -> float | None:
    """``lost_after`` must be None (no liveness check) or a positive number of seconds."""
    from rpycsvc.errors import ConfigError

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"lost_after must be a positive number of seconds or None; "
                          f"got {value!r}")
    return float(value)


# -- the server's side ----------------------------------------------------------------------


class Heartbeat:
    """Writes an empty frame on each registered connection every ``interval`` seconds.

    One thread for the whole server, so it must never block: a connection is skipped for
    this beat when its socket can't take 6 bytes right now (its client is frozen or not
    reading: its client sees unread bytes, not silence) or when another thread is sending
    on it (bytes are flowing to the client anyway).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[Connection, list[float]] = {}  # conn -> [interval, next due]
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, conn: Connection, interval: float) -> float:
        """Start beating on ``conn``; returns the interval granted."""
        interval = max(MIN_INTERVAL, min(MAX_INTERVAL, float(interval)))
        with self._lock:
            self._conns[conn] = [interval, time.monotonic() + interval]
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rpycsvc-heartbeat",
                                                daemon=True)
                self._thread.start()
        self._wake.set()
        return interval

    def remove(self, conn: Connection) -> None:
        with self._lock:
            self._conns.pop(conn, None)

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                if not self._conns:  # nothing to do: end; add() starts a new thread
                    self._thread = None
                    return
                due = [c for c, (_, at) in self._conns.items() if at <= now]
                for c in due:
                    entry = self._conns[c]
                    entry[1] = now + entry[0]
                nxt = min((at for _, at in self._conns.values()), default=now + 1.0)
            if due:
                try:
                    self._beat(due)
                except Exception:  # one connection's trouble must not end everyone's beat
                    log.exception("heartbeat round failed; going on")
            self._wake.wait(max(0.0, min(1.0, nxt - time.monotonic())))
            self._wake.clear()

    def _beat(self, conns: list[Connection]) -> None:
        fds: dict[int, Connection] = {}
        for conn in conns:
            if conn.closed:
                self.remove(conn)
                continue
            fd = out_fd(conn._channel.stream)
            if fd is not None:
                fds[fd] = conn
        if not fds:
            return
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLOUT)
        try:
            ready = poller.poll(0)
        except OSError:
            return
        for fd, events in ready:
            if events & select.POLLOUT and not events & (select.POLLERR | select.POLLHUP):
                self._send_empty(fds[fd])

    @staticmethod
    def _send_empty(conn: Connection) -> None:
        """One empty frame, under RPyC's send lock (never waiting for it)."""
        lock = conn._sendlock
        if not lock.acquire(False):
            return  # a send is under way
        try:
            conn._channel.send(b"")
        except Exception:  # closed under us: its connection thread sees that too
            pass
        finally:
            _release(lock)
        if conn._send_queue:
            # RPyC's _send() queues a message when the lock is held and leaves it to the
            # holder — us — to send. Sending it may take long: not in this thread.
            threading.Thread(target=_flush_queue, args=(conn,), daemon=True,
                             name="rpycsvc-heartbeat-flush").start()


def _flush_queue(conn: Connection) -> None:
    """Send what RPyC queued while the heartbeat held the send lock (as ``_send`` does)."""
    try:
        flush_queue(conn)
    except Exception:  # closed meanwhile: the connection's reader sees it too
        pass


def _release(lock: Any) -> None:
    """Release RPyC's send lock, which its cleanup of a connection closing meanwhile may
    have released already (``RuntimeError: release unlocked lock``)."""
    try:
        lock.release()
    except RuntimeError:
        pass


# -- the client's side ------------------------------------------------------------------------


class LiveChannel(FastChannel):
    """A client's channel that notes when each frame arrived (heartbeats included): the
    liveness check's clock for streams that don't record ``last_activity``. rpycsvc's own
    streams (sockets, ssh pipes, ssh channels) do, as each piece of a message arrives, so a
    large message in progress is never silence; RPyC's own streams only note whole frames."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.last_frame = time.monotonic()

    def recv(self) -> bytes:
        data = super().recv()
        self.last_frame = time.monotonic()
        return data


class ClientConnection(SendRaceSafe):
    """A client's RPyC connection: synchronous requests (classic calls, ``conn.root.x``)
    wait as long as the server takes, bounded by liveness instead of a timer, and fail with
    :class:`ServerLostError` once the connection is declared lost.

    ``request_timeout`` (None: none) bounds them anyway; ``connect`` uses it for ``hello``.
    Without it, the ``sync_request_timeout`` of the connection's config does (``connect``
    sets None; a caller that wants its calls bounded, like ``rpycsvc status``, sets it).
    """

    lost_error: ServerLostError | None = None
    request_timeout: float | None = None

    def _lost_while_sending(self) -> BaseException:
        return self.lost_error or super()._lost_while_sending()

    def sync_request(self, handler: int, *args: Any) -> Any:
        lost = self.lost_error
        if lost is not None:
            if handler == consts.HANDLE_CLOSE:
                raise EOFError(str(lost))  # what Connection.close() expects of a dead peer
            raise lost
        # Closing says goodbye to a peer that may not answer: a few seconds are enough.
        limit = CLOSE_WAIT if handler == consts.HANDLE_CLOSE else self.request_timeout
        if limit is None:
            limit = self._config.get("sync_request_timeout")
        deadline = None if limit is None else time.monotonic() + limit
        box = _Reply()
        try:
            try:
                self._async_request(handler, args, box)
            except RuntimeError as exc:
                # RPyC's cleanup of a connection that died under this send released the
                # send lock ("release unlocked lock"): report the loss, not RPyC's lock
                if not (self.closed or self.lost_error is not None):
                    raise
                raise (self.lost_error or EOFError("the connection to the server was "
                                                   "lost while sending")) from exc
            while not box.done:
                lost = self.lost_error
                if lost is not None:
                    raise lost
                wait = 1.0
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise RpycsvcTimeoutError(f"the server did not answer within {limit:g} s")
                # Returns within `wait` unless it blocks mid-frame; mark_lost() wakes that.
                self.serve(wait, waiting=lambda: not box.done)
        except (EOFError, OSError) as exc:
            lost = self.lost_error
            # mark_lost() answers our box with the loss, then shuts the socket down: the
            # EOF that wakes us is its echo, whether or not the box was filled first
            if lost is not None and exc is not lost and (not box.done or box.obj is lost):
                raise lost from exc
            raise
        if box.is_exc:
            raise box.obj
        return box.obj

    def _unbox_exc(self, raw: Any) -> Any:
        """The server's exception; :class:`~rpycsvc.errors.MessageTooLargeError` (a request
        over the server's message limit) as itself, so callers can catch it, rather than
        as RPyC's generic stand-in for a class it may not instantiate."""
        try:
            (modname, clsname), *_ = raw
        except (TypeError, ValueError):
            return super()._unbox_exc(raw)
        if (modname, clsname) == ("rpycsvc.errors", "MessageTooLargeError"):
            return vinegar.load(raw, import_custom_exceptions=False,
                                instantiate_custom_exceptions=True,
                                instantiate_oldstyle_exceptions=False)
        return super()._unbox_exc(raw)

    def mark_lost(self, error: ServerLostError) -> None:
        """Declare the connection lost and wake every thread waiting on it.

        Waiters of ``sync_request`` see ``lost_error`` within a second; those of RPyC's own
        ``AsyncResult`` get ``error`` as their reply; a thread blocked reading a frame is
        woken by shutting the socket down (a pipe can't be: it gets EOF when it closes); a
        thread blocked writing to a pipe gives up within half a second (``abort``).
        """
        if self.lost_error is not None:
            return
        self.lost_error = error
        for seq in list(self._request_callbacks):
            callback = self._request_callbacks.pop(seq, None)
            if callback is not None:
                try:
                    callback(True, error)
                except Exception:
                    pass
        with self._recv_event:
            self._recv_event.notify_all()
        stream = self._channel.stream
        abort = getattr(stream, "abort", None)
        if abort is not None:  # pipes: a write blocked on a frozen peer gives up
            abort()
        sock = getattr(stream, "sock", None)
        try:
            sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        except (OSError, AttributeError, EOFError):  # EOFError: RPyC's ClosedFile
            pass

    def silent_for(self, now: float) -> float:
        """Seconds since the last byte arrived, or 0 if some are waiting to be read (the
        server spoke; this side is busy)."""
        stream = self._channel.stream
        heard = max(getattr(stream, "last_activity", 0.0),
                    getattr(self._channel, "last_frame", 0.0))
        silence = now - heard
        if silence <= 0:
            return 0.0
        try:
            sock = getattr(stream, "sock", None)
            if sock is not None and getattr(sock, "pending", lambda: 0)():
                return 0.0  # decrypted TLS bytes nobody has read yet
            if stream.poll(0):
                return 0.0
        except Exception:  # closed: the reader thread reports that
            return 0.0
        return silence


class _Reply:
    """Receives one reply (RPyC calls it with ``(is_exc, obj)``)."""

    __slots__ = ("done", "is_exc", "obj")

    def __init__(self) -> None:
        self.done = False
        self.is_exc = False
        self.obj: Any = None

    def __call__(self, is_exc: bool, obj: Any) -> None:
        self.is_exc, self.obj, self.done = is_exc, obj, True


class LiveClassicClient(ClassicClient):
    """RPyC's classic client service over a :class:`ClientConnection`."""

    _protocol = ClientConnection


class LiveVoidService(VoidService):
    """RPyC's void service (service-only servers) over a :class:`ClientConnection`."""

    _protocol = ClientConnection


class Watchdog:
    """One thread per process that checks each watched connection a few times a second.

    ``watch(conn, lost_after, on_lost)``: when ``conn`` has been silent for ``lost_after``
    seconds, ``on_lost(silence)`` runs once, in a thread of its own (it fails tasks and runs
    callbacks that may take time; other connections must still be checked meanwhile).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[weakref.ref[ClientConnection], float,
                                       Callable[[float], None]]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, conn: ClientConnection, lost_after: float,
              on_lost: Callable[[float], None]) -> None:
        with self._lock:
            self._watched[id(conn)] = (weakref.ref(conn), lost_after, on_lost)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rpycsvc-liveness",
                                                daemon=True)
                self._thread.start()

    def unwatch(self, conn: ClientConnection) -> None:
        with self._lock:
            self._watched.pop(id(conn), None)

    def _run(self) -> None:
        while True:
            time.sleep(0.2)
            now = time.monotonic()
            with self._lock:
                if not self._watched:  # nothing to do: end; watch() starts a new thread
                    self._thread = None
                    return
                items = list(self._watched.items())
            for key, (ref, lost_after, on_lost) in items:
                conn = ref()
                if conn is None or conn.closed or conn.lost_error is not None:
                    with self._lock:
                        self._watched.pop(key, None)
                    continue
                silence = conn.silent_for(now)
                if silence > lost_after:
                    with self._lock:
                        self._watched.pop(key, None)
                    threading.Thread(target=on_lost, args=(silence,), daemon=True,
                                     name="rpycsvc-server-lost").start()


WATCHDOG = Watchdog()
