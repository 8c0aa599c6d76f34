"""Sending task messages: how a connection's threads write them, in order with its RPyC
messages, without blocking the threads that must not block.

The format of a task message is :mod:`rpycsvc.protocol.taskframes`; this module is what
writes one. It goes through RPyC's own send queue and lock (whoever holds the lock sends
everything queued), so task and RPyC messages never interleave. A sender either waits
until its message is written (:func:`send_task` with ``wait=True``: a client's call, whose
buffers the caller may change afterwards) or hands it over and returns at once
(``wait=False``, :func:`send_framed`): the threads that send that way are ones others wait
on (a connection's reader, the server's reader of a worker, whose results are other
clients' too), so they must never block on a full socket or pipe. For them:

* a small message that finds the connection idle and its descriptor writable is written
  by the sender itself, with one non-blocking send (no thread wake-up per result); when
  only a part fits, the rest and the send lock are handed to the writer thread, so nothing
  comes between the two parts (:class:`_Rest`);
* anything else goes to the connection's writer thread (:class:`_Writer`, one per
  connection, started on first use), which also sends what RPyC queued while a
  non-blocking sender held the lock.

A server shutting down waits for the writer threads (:func:`drain`) before it closes its
connections. Kept apart from the format because it is a different concern: the format is
what both ends agree on; this is how one end's threads share a connection's send lock.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from rpycsvc.protocol.taskframes import INLINE, TaskMessage

log = logging.getLogger("rpycsvc.protocol")


def send_task(conn: Any, control: tuple[Any, ...], frames: Sequence[Any] = (), *,
              wait: bool = True, owned: bool = False) -> None:
    """Send one task message on RPyC connection ``conn`` (its channel a FastChannel), in
    order with its RPyC messages.

    ``wait=True``: written before this returns (by this thread, or by the thread that holds
    the send lock), so the caller may change its buffers afterwards; raises ``EOFError`` /
    ``OSError`` when the connection dies meanwhile. ``wait=False``: returns at once; the
    connection's writer thread sends it, and a failure is left to the connection's reader
    to report. Either way the caller may change its buffers once this returns: with
    ``wait=False`` large frames that aren't ``bytes`` are copied first, unless ``owned``
    says nobody else holds them (a result the server just received from its worker).
    """
    if not wait and not owned and sum(memoryview(f).nbytes for f in frames) >= INLINE:
        frames = [f if type(f) is bytes else bytes(f) for f in frames]
    msg = TaskMessage(control, frames)
    if wait:
        _send_now(conn, msg)
        return
    if not msg.large and len(msg.head) <= DIRECT_MAX and _send_if_free(conn, msg):
        return
    _writer_of(conn).put(msg)


def send_framed(conn: Any, head: Any) -> None:
    """Queue the whole task message ``head`` (from
    :func:`~rpycsvc.protocol.taskframes.framed_reply`) on ``conn``, as
    ``send_task(..., wait=False)`` does: in order with the connection's other messages."""
    msg = TaskMessage.framed(head)
    if len(head) <= DIRECT_MAX and _send_if_free(conn, msg):
        return
    _writer_of(conn).put(msg)


#: A message this small that finds the connection idle and its socket or pipe writable is
#: written by the sender itself: no hand-over to the writer thread, which costs a thread
#: wake-up per result. Writable means the kernel has room for at least this much (a socket
#: with ``tune_socket``'s buffers has megabytes; a pipe at least ``PIPE_BUF``, 4 KiB), so
#: the write does not block.
DIRECT_MAX = 4096


def _send_if_free(conn: Any, msg: TaskMessage) -> bool:
    """Write ``msg`` now if nothing is queued or being written on ``conn`` and its outgoing
    descriptor has room; False (nothing written) otherwise."""
    writer = _writers.get(conn)  # (none yet: nothing of ours can be pending)
    if conn._send_queue or (writer is not None and writer.pending):
        return False
    stream = conn._channel.stream
    sock: Any = getattr(stream, "sock", None)
    plain = type(sock) is socket.socket
    fd = None if plain else out_fd(stream)
    if fd is None and not plain:
        return False
    lock: Any = conn._sendlock
    if not lock.acquire(False):
        return False
    try:
        # (checked again under the lock: the writer counts a message as pending from put()
        # until it is written, so one of ours queued earlier can't be overtaken)
        if conn._send_queue or (writer is not None and writer.pending) or conn.closed:
            return False
        if plain:
            # one non-blocking send instead of select() + send: all of it, or nothing
            # (then the writer thread sends it). A part only when the buffer had less room
            # than the message: the writer thread sends the rest, and the send lock goes
            # with it (nothing may come between), so this thread never blocks — it may be
            # a worker's reader, which other clients' results wait on.
            done = _send_nowait(stream, sock, msg)
            if done is _REST_HANDED:
                _writer_of(conn).put_rest(msg, lock)
                lock = None  # released by the writer once the rest is written
                return True
            return bool(done)
        try:
            if not select.select((), (fd,), (), 0)[1]:
                return False
        except (OSError, ValueError):
            return False
        try:
            conn._channel.send(msg)
        except (EOFError, OSError, ValueError):
            pass  # the connection's reader reports the loss
        return True
    finally:
        if lock is not None:
            try:
                lock.release()
            except RuntimeError:
                pass
        if conn._send_queue:  # queued while we held the lock: RPyC leaves them to us
            _writer_of(conn).put_flush()


#: What :func:`_send_nowait` returns when only a part of the message went out.
_REST_HANDED: Any = object()


def _send_nowait(stream: Any, sock: socket.socket, msg: TaskMessage) -> Any:
    """``msg`` (inline only) written on plain socket ``sock`` without waiting for room;
    False if the socket had no room at all (nothing written); :data:`_REST_HANDED` if only
    a part went out (``msg.head`` is then the rest, for the writer thread). Called with the
    send lock."""
    head = msg.head
    try:
        n = sock.send(head, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # the connection's reader reports the loss
    if n < len(head):
        msg.head = memoryview(head)[n:]
        return _REST_HANDED
    msg.sent = True
    from rpycsvc.protocol.socket_stream import TRAFFIC

    TRAFFIC["out"] += len(head)
    return True


def out_fd(stream: Any) -> int | None:
    """The file descriptor the stream writes to (a socket's, or a pipe's outgoing end);
    None when there is none, or it was closed (a closed socket's ``fileno()`` is -1).
    (Also the heartbeat's: rpycsvc.protocol.liveness.)"""
    fd = -1
    try:
        sock = getattr(stream, "sock", None)
        if sock is not None:
            fd = int(sock.fileno())
        else:
            outgoing = getattr(stream, "outgoing", None)
            if outgoing is not None:
                fd = int(outgoing.fileno())
    except (OSError, ValueError, EOFError, AttributeError):
        pass
    return fd if fd >= 0 else None


def _send_now(conn: Any, msg: TaskMessage) -> None:
    q = conn._send_queue
    lock = conn._sendlock
    q.append(msg)
    channel = conn._channel
    lock.acquire()
    try:
        # Whoever holds the lock sends everything queued (RPyC's protocol): ours may have
        # gone out with another thread's already.
        while q and not msg.sent:
            channel.send(q.pop(0))
    except RuntimeError as exc:  # rpyc's cleanup released the lock under us
        raise EOFError("the connection closed while a message was being sent") from exc
    finally:
        try:
            lock.release()
        except RuntimeError:
            pass
    flush_queue(conn)
    if not msg.sent and conn.closed:
        raise EOFError("the connection is closed")


def flush_queue(conn: Any) -> None:
    """Send what is queued on ``conn``, as RPyC's ``_send`` does: whoever gets the lock
    sends; checked again after each release."""
    q = conn._send_queue
    lock = conn._sendlock
    channel = conn._channel
    while q:
        if not lock.acquire(False):
            return
        try:
            if q:
                channel.send(q.pop(0))
        finally:
            try:
                lock.release()
            except RuntimeError:
                pass


class _Rest:
    """The rest of a message begun on the wire, and the send lock held for it."""

    __slots__ = ("lock", "msg")

    def __init__(self, msg: TaskMessage, lock: Any) -> None:
        self.msg, self.lock = msg, lock

    def release(self) -> None:
        try:
            self.lock.release()
        except RuntimeError:  # RPyC's cleanup of a closing connection released it
            pass


class _Writer:
    """A connection's writer thread for messages whose senders must not block."""

    def __init__(self, conn: Any) -> None:
        self._conn = weakref.ref(conn)
        self.queue: queue.SimpleQueue[TaskMessage | _Rest | None] = queue.SimpleQueue()
        #: messages put and not yet written (read without a lock: see _send_if_free)
        self.pending = 0
        #: their bytes (read without a lock: see unsent_bytes)
        self.unsent = 0
        #: (limit, callback): call once ``unsent`` is at most ``limit`` (see when_unsent_below)
        self._waiting: list[tuple[int, Callable[[], None]]] = []
        self.stopped = False  # the connection closed or broke: see _stop
        self._count = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="rpycsvc-task-writer",
                                       daemon=True)
        self.thread.start()

    def put(self, msg: TaskMessage) -> None:
        with self._count:
            self.pending += 1
            self.unsent += msg.nbytes
        self.queue.put(msg)

    def put_flush(self) -> None:
        """Have the writer send what RPyC queued on the connection (see ``_send_now``)."""
        self.queue.put(None)

    def put_rest(self, msg: TaskMessage, lock: Any) -> None:
        """Have the writer send the rest of ``msg``, begun on the wire by a thread that
        must not block, and then release ``lock`` (the connection's send lock, which that
        thread holds and hands over: nothing may be written in between)."""
        with self._count:
            self.pending += 1
            self.unsent += msg.nbytes
        self.queue.put(_Rest(msg, lock))

    def when_below(self, limit: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, in the writer thread, or now) when at most ``limit``
        bytes are left to write (now if this writer has stopped: nothing is left)."""
        with self._count:
            if self.unsent > limit and not self.stopped:
                self._waiting.append((limit, callback))
                return
        callback()

    def _run(self) -> None:
        try:
            self._write_until_closed()
        finally:
            self._stop()

    def _stop(self) -> None:
        """The connection is closed or broken: drop what is left. Nothing here may keep it
        (or its unsent results) alive: the callbacks waiting for room hold its endpoint,
        which holds the connection, the key of ``_writers``."""
        with self._count:
            self.stopped = True
            self._waiting = []
            self.pending = self.unsent = 0
        while True:
            try:
                msg = self.queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, _Rest):
                msg.release()

    def _write_until_closed(self) -> None:
        while True:
            try:
                msg = self.queue.get(timeout=1.0)
            except queue.Empty:
                conn = self._conn()
                if conn is None or conn.closed:
                    return
                del conn
                continue
            conn = self._conn()
            if conn is None or conn.closed:
                if isinstance(msg, _Rest):
                    msg.release()
                return
            size = 0 if msg is None else msg.msg.nbytes if isinstance(msg, _Rest) else msg.nbytes
            try:
                if msg is None:
                    flush_queue(conn)
                elif isinstance(msg, _Rest):
                    try:
                        conn._channel.stream.write(msg.msg.head)
                        msg.msg.sent = True
                    finally:
                        msg.release()
                    flush_queue(conn)
                else:
                    _send_now(conn, msg)
            except (EOFError, OSError, ValueError):
                return  # the reader reports the loss
            finally:
                ready: list[Callable[[], None]] = []
                if msg is not None:
                    with self._count:
                        self.pending -= 1
                        self.unsent -= size
                        if self._waiting:
                            ready = [cb for lim, cb in self._waiting if self.unsent <= lim]
                            self._waiting = [w for w in self._waiting if self.unsent > w[0]]
                del conn, msg  # a large message is freed once it is sent
                for callback in ready:
                    try:
                        callback()
                    except Exception:  # (the writer must go on writing)
                        log.exception("a callback for written output failed")


_writers: weakref.WeakKeyDictionary[Any, _Writer] = weakref.WeakKeyDictionary()
_writers_lock = threading.Lock()


def _writer_of(conn: Any) -> _Writer:
    w = _writers.get(conn)
    if w is None or not w.thread.is_alive():
        with _writers_lock:
            w = _writers.get(conn)
            if w is None or not w.thread.is_alive():
                w = _writers[conn] = _Writer(conn)
    return w


def unsent_bytes(conn: Any) -> int:
    """Bytes handed to ``conn``'s writer thread and not yet written: what its peer has not
    read yet, roughly (a peer that reads keeps it near 0). Read without a lock."""
    w = _writers.get(conn)
    return 0 if w is None else w.unsent


def when_unsent_below(conn: Any, limit: int, callback: Callable[[], None]) -> None:
    """Call ``callback`` once at most ``limit`` bytes are left for ``conn``'s writer to write
    (now, if so already; in the writer thread otherwise). Not called if the connection
    closes first."""
    _writer_of(conn).when_below(limit, callback)


def drain(timeout: float) -> bool:
    """Wait (at most ``timeout`` seconds) until every connection's writer thread has
    written what it was given: a server shutting down calls it before it closes its
    connections, so results handed over in the grace period reach their clients. True if
    all were written."""
    deadline = time.monotonic() + timeout
    while True:
        with _writers_lock:
            busy = [w for w in _writers.values() if w.pending and w.thread.is_alive()]
        if not busy:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)  # (shutdown only: a short poll beats a wake-up on every write)
