"""Task messages: how an rpycsvc client's tasks travel, on every transport.

A task message rides *inside* the client's one RPyC connection, in order with its RPyC
messages, so it goes wherever that connection goes (plain TCP, TLS, the pipes of an ssh
session) and shares its handshake, liveness and limits. RPyC's frame header is ``!LB``:
a 32-bit length and a one-byte flag (0, or 1 for a zlib-compressed frame). A frame whose
flag is :data:`TASK_FLAG` is not an RPyC message but one task message:

* the header's length says how many bytes follow *inline*: the number of frames and the
  control tuple's length, each frame's 64-bit length, the pickled control tuple and, when
  their total is small, the frames themselves;
* large frames follow on their own, written from the sender's buffers (no join, no copy)
  and read into one buffer each (an anonymous mmap, whose pages are taken as the bytes
  arrive), so a 1 GiB array crosses with one copy at each end.

The :class:`~rpycsvc.protocol.channel.FastChannel` reading such a frame hands the message to its
``task_handler`` (in the reading thread) and returns an empty frame to RPyC, which reads
that as "nothing arrived". A channel without a handler (a plain RPyC peer, or one that
has not said the rpycsvc hello) refuses the frame and closes the connection. Sending goes
through RPyC's own send queue and lock, so task and RPyC messages never interleave.

Control tuples hold only builtin scalars and containers: a peer's control tuple is
unpickled with a loader that resolves no globals at all.
"""

from __future__ import annotations

import io
import mmap
import pickle
import queue
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

#: The flag byte of an RPyC frame header that marks a task message.
TASK_FLAG = 2
#: The most bytes of a control tuple in the inline part (a larger one is the first frame).
MAX_CONTROL = 64 << 10
#: The most bytes a control part sent as the first frame may have when its message is over
#: the limit (it is read only to answer that task with the refusal).
MAX_CONTROL_FRAME = 64 << 20
#: The most frames one message may carry.
MAX_FRAMES = 1 << 16
#: Frames are sent inline (in the header's write) while their total is below this.
INLINE = 64 << 10
#: The most inline bytes a peer may announce: counts, lengths, control and inline frames.
MAX_INLINE = 8 + 8 * MAX_FRAMES + MAX_CONTROL + INLINE
#: Set in a frame's length when its source was read-only (``bytes``): the receiver keeps
#: it read-only, so a ``bytes`` argument arrives as ``bytes`` again.
READONLY = 1 << 63
#: Frames at least this large are read into an anonymous mmap (lazily committed).
LAZY = 1 << 20
#: Large frames are read this much at a time (each piece taken from the inbound budget).
PIECE = 1 << 20

_COUNTS = struct.Struct("!II")  # number of frames, control length
#: The control length that says "the control part is the first frame" (it is over
#: MAX_CONTROL: long output lines, large log records, a module's source).
CONTROL_IN_FRAME = 0xFFFFFFFF
_LEN = struct.Struct("!Q")
_FRAME_HEADER = struct.Struct("!LB")  # RPyC's (see rpyc.core.channel.Channel)


class TaskHandler(Protocol):
    """What a channel hands task messages to (called in the connection's reading thread).

    A handler with an ``on_small_task(control, inline, size)`` method gets small ``run``
    messages (all their frames inline, ``size`` bytes of them) that way instead: ``inline``
    is the whole inline block as it came, its frames unread (the server forwards it to a
    worker as it is)."""

    def on_task(self, control: tuple[Any, ...], frames: list[Any]) -> None: ...

    def on_task_refused(self, control: tuple[Any, ...], text: str) -> None: ...


_NONE: list[memoryview] = []  # (never changed: the large frames of a small message)


def small_plain(frames: Sequence[Any], limit: int = INLINE) -> bool:
    """Frames that are all ``bytes``/``bytearray`` and together under ``limit`` bytes (sent
    inline, here and on the worker channel: rpycsvc.server.wire)."""
    total = 0
    for f in frames:
        t = type(f)
        if t is not bytes and t is not bytearray:
            return False
        total += len(f)
    return total < limit


class TaskMessage:
    """One task message, ready to write: the inline block and the large frames."""

    __slots__ = ("head", "large", "sent")
    large: list[memoryview]

    def __init__(self, control: tuple[Any, ...], frames: Sequence[Any] = (), *,
                 relayed: bool = False) -> None:
        """``relayed``: flag as read-only only read-only memoryviews, not ``bytes`` (what a
        message relayed from a worker carried: the worker channel flags only those, see
        :mod:`rpycsvc.server.wire`), so a worker framing a client's message itself
        (:func:`framed_reply`) sends exactly the bytes the server would have."""
        ctl = pickle.dumps(control, protocol=5)
        ctl_len = len(ctl)
        if ctl_len <= MAX_CONTROL and len(frames) <= 2 and small_plain(frames):
            # the common case (a call, a small result, a line of output), in one pass
            if not frames:
                self.head = _FRAME_HEADER.pack(_COUNTS.size + ctl_len, TASK_FLAG) + \
                    _COUNTS.pack(0, ctl_len) + ctl
            else:
                lens = b"".join([_LEN.pack(len(f) | READONLY
                                           if type(f) is bytes and not relayed else len(f))
                                 for f in frames])
                inline = b"".join([_COUNTS.pack(len(frames), ctl_len), lens, ctl, *frames])
                self.head = _FRAME_HEADER.pack(len(inline), TASK_FLAG) + inline
            self.large = _NONE
            self.sent = False
            return
        if ctl_len > MAX_CONTROL:
            # A large control part (a long line of output, a log record, a module's source)
            # travels as the first frame instead: read with the frames' limits and budget.
            frames = [ctl, *frames]
            ctl, ctl_len = b"", CONTROL_IN_FRAME
        views = [f if type(f) is memoryview else memoryview(f) for f in frames]
        sizes = [v.nbytes for v in views]
        lens = b"".join(_LEN.pack(n | READONLY if v.readonly and (
            not relayed or type(f) is memoryview) else n)
                        for n, v, f in zip(sizes, views, frames))
        small = sum(sizes) < INLINE
        parts = [_COUNTS.pack(len(views), ctl_len), lens, ctl]
        if small:
            parts.extend(views)
        inline = b"".join(parts)
        self.head = _FRAME_HEADER.pack(len(inline), TASK_FLAG) + inline
        self.large = [] if small else [
            v if v.ndim == 1 and v.itemsize == 1 and v.c_contiguous else v.cast("B")
            for v in views]
        self.sent = False

    @classmethod
    def framed(cls, head: Any) -> TaskMessage:
        """A message framed elsewhere (a worker's :func:`framed_reply`): sent as it is."""
        msg = cls.__new__(cls)
        msg.head = head
        msg.large = _NONE
        msg.sent = False
        return msg

    def write_to(self, stream: Any) -> None:
        """Write the whole message to ``stream`` (the caller holds the send lock)."""
        stream.write(self.head)
        for view in self.large:
            stream.write(view)
        self.sent = True


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"a task message's control part may hold no objects of {module}.{name}")


def load_control(data: Any) -> tuple[Any, ...]:
    """A peer's control tuple: builtin scalars and containers only (no globals)."""
    control = _NoGlobals(io.BytesIO(data)).load()
    if type(control) is not tuple or not control or type(control[0]) is not str:
        raise pickle.UnpicklingError("a task message's control part must be a tuple "
                                     "starting with its kind")
    return control


def parse_inline(inline: Any, *, writable: bool = False,
                 ) -> tuple[tuple[Any, ...] | None, list[int], list[Any]]:
    """``(control, frame lengths with flags, frames sent inline)`` of an inline block;
    control None: it is the first frame (see :data:`CONTROL_IN_FRAME`). Inline frames are
    ``bytes`` where flagged read-only, else bytearrays (``writable``: bytearrays all)."""
    control, lens, at = parse_head(inline)
    return control, lens, inline_frames(inline, lens, at, writable=writable)


def inline_frames(inline: Any, lens: list[int], at: int, *,
                  writable: bool = False) -> list[Any]:
    """The frames of an inline block from ``at`` on (see :func:`parse_inline`); none if
    they weren't sent inline."""
    view = memoryview(inline)
    frames: list[Any] = []
    if at < len(view):
        for n in lens:
            size = n & ~READONLY
            if at + size > len(view):
                raise ValueError("a corrupt task message: a frame runs past its inline bytes")
            piece = view[at:at + size]
            frames.append(bytes(piece) if n & READONLY and not writable
                          else bytearray(piece))
            at += size
        if at != len(view):
            raise ValueError("a corrupt task message: inline bytes left over")
    return frames


def parse_head(inline: Any) -> tuple[tuple[Any, ...] | None, list[int], int]:
    """``(control, frame lengths with flags, where the inline frames start)`` of an inline
    block (see :func:`parse_inline`); the frames themselves are not looked at."""
    view = memoryview(inline)
    if len(view) < _COUNTS.size:
        raise ValueError("a task message shorter than its counts")
    nframes, ctl_len = _COUNTS.unpack_from(view)
    at = _COUNTS.size
    in_frame = ctl_len == CONTROL_IN_FRAME
    if in_frame:
        ctl_len = 0
    if nframes > MAX_FRAMES or ctl_len > MAX_CONTROL or (in_frame and not nframes) \
            or len(view) < at + 8 * nframes + ctl_len:
        raise ValueError(f"a corrupt task message ({nframes} frames, a control part of "
                         f"{ctl_len} bytes in {len(view)} inline bytes)")
    lens = list(struct.unpack_from(f"!{nframes}Q", view, at)) if nframes else []
    at += 8 * nframes
    control = None if in_frame else load_control(view[at:at + ctl_len])
    return control, lens, at + ctl_len


def framed_reply(control: tuple[Any, ...], frames: Sequence[Any]) -> bytes | None:
    """The whole task message ``control`` + ``frames`` as bytes, ready for a client's
    connection, if it is small (inline only); None otherwise. A worker frames a task's
    ``done`` with it, so the server relays the bytes without unpickling or framing anything
    (:func:`send_framed`)."""
    if sum(memoryview(f).nbytes for f in frames) >= INLINE:
        return None
    msg = TaskMessage(control, frames, relayed=True)
    return None if msg.large else msg.head


def new_buffer(size: int) -> Any:
    """A writable buffer of ``size`` bytes: an anonymous mmap when large (its pages are
    taken as the bytes arrive; a bytearray is zero-filled, all of it, first)."""
    return bytearray(size) if size < LAZY else mmap.mmap(-1, size)


# -- sending ----------------------------------------------------------------------------------


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
    """Queue the whole task message ``head`` (from :func:`framed_reply`) on ``conn``, as
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
        self._count = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="rpycsvc-task-writer",
                                       daemon=True)
        self.thread.start()

    def put(self, msg: TaskMessage) -> None:
        with self._count:
            self.pending += 1
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
        self.queue.put(_Rest(msg, lock))

    def _run(self) -> None:
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
                if msg is not None:
                    with self._count:
                        self.pending -= 1
                del conn, msg  # a large message is freed once it is sent


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
