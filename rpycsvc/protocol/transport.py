"""RPyC transport fixes: a linear-time socket stream, a channel without wasted compression,
and a connection that can answer a request later (so one connection runs many tasks at once).

Why each exists (measured on RPyC 6.0.2, see shared/research/rpyc-facts.md):

* ``SocketStream.write`` re-slices the remaining bytes after every 64 KB send, which is
  quadratic: 64 MiB took ~20 s. :class:`FastSocketStream` sends through a ``memoryview``
  and receives with ``recv_into`` into one buffer; it also sets ``TCP_NODELAY``, without
  which small replies stall on Nagle + delayed ACK.
* ``Channel`` zlib-compresses every frame over 3 KB, which costs CPU and gains nothing on
  pickles of numbers or random data; :class:`FastChannel` never compresses (it still reads
  compressed frames from plain RPyC peers) and avoids copying the frame to strip its ``\\n``.
* RPyC replies to a request in the thread that received it, so a connection serves one
  request at a time. A service method may return a :class:`Deferred`; the
  :class:`ServerConnection` then goes on reading requests and the reply is sent when the
  deferred is resolved, from whichever thread resolves it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import sys
import threading
import time
import zlib
from typing import Any, Callable

from rpyc.core import brine, consts
from rpyc.core.channel import Channel
from rpyc.core.protocol import Connection
from rpyc.core.stream import SocketStream
from rpyc.lib import Timeout

from rpycsvc.errors import MessageTooLargeError
from rpycsvc.protocol import taskframes

log = logging.getLogger("rpycsvc.server")

#: The RPyC protocol settings of rpycsvc's connections, on both ends.
PROTOCOL_CONFIG = {
    "allow_public_attrs": True,
    "sync_request_timeout": None,  # compute calls take as long as their tasks
    "include_local_traceback": True,
}


_CHUNK = 1 << 20

#: The most an RPyC frame header can announce (its length field has 32 bits).
WIRE_MAX = 0xFFFFFFFF
#: Largest message from a peer that has not yet authenticated (with an authkey) or said a
#: valid hello (without one): a hello or a first request is a few hundred bytes.
PREAUTH_MAX_MESSAGE = 64 << 10
#: Headroom a sender keeps below the receiver's limit for RPyC's and brine's framing.
MESSAGE_OVERHEAD = 64 << 10
#: The setting that bounds messages, as the CLI and the environment spell it.
MESSAGE_SETTING = "--max-message-size (RPYCSVC_MAX_MESSAGE_SIZE)"
#: Messages up to this size are read without waiting for the inbound budget: they cost at
#: most this much per connection (one message is read at a time per connection), and they
#: keep flowing (calls, replies, hellos, a plain client's first request) while large
#: messages wait for room, e.g. behind a peer that stalled in the middle of a large one.
SMALL_MESSAGE = PREAUTH_MAX_MESSAGE
#: Default seconds a peer may send nothing in the middle of a message that holds a part of
#: the inbound budget before it is dropped and its part freed (``--stall-timeout``).
DEFAULT_STALL_TIMEOUT = 30.0
#: The setting that bounds such a stall, as the CLI and the environment spell it.
STALL_SETTING = "--stall-timeout (RPYCSVC_STALL_TIMEOUT)"

#: Bytes this process received and sent on rpycsvc streams (for metrics; approximate).
TRAFFIC = {"in": 0, "out": 0}


def format_size(n: int) -> str:
    """``2147483648`` → ``"2 GiB"``, ``5000`` → ``"5000 bytes"`` (exact units only)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def too_large_message(what: str, size: int, limit: int) -> str:
    """The text of a :class:`~rpycsvc.errors.MessageTooLargeError`: the size, the limit,
    the setting, and what to do about it."""
    return (f"the {what} of this task ({size} bytes) would be over the server's message limit "
            f"of {format_size(limit)} ({limit} bytes, set by {MESSAGE_SETTING}; "
            f"{format_size(MESSAGE_OVERHEAD)} of it is kept for framing). Raise the limit on "
            "the server, or send less at once (split the data, or have the task read or write "
            "it elsewhere)")


def payload_size(obj: Any, depth: int = 4) -> int:
    """Bytes of the ``bytes``/``str`` data in ``obj`` and the tuples holding it (shallow):
    what a message carrying ``obj`` costs, less its small framing."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return memoryview(obj).nbytes
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, tuple) and depth > 0:
        return sum(payload_size(x, depth - 1) for x in obj)
    return 0


def oversize(payload: Any, limit: Any, what: str = "arguments") -> str | None:
    """The sender's check: an error text if a message carrying ``payload`` would be over
    ``limit`` bytes (the receiver's limit, headroom for framing included); None if it fits
    or ``limit`` is unknown. Checked before anything is sent, so only this task fails and
    the connection stays as it was."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    size = payload_size(payload)
    if size + MESSAGE_OVERHEAD <= limit:
        return None
    return too_large_message(what, size, limit)


class _RateLimitedLog:
    """A warning per kind of event at most every ``every`` seconds (the rest at debug
    level): one attacker making thousands of connections should not make thousands of
    warnings."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}

    def log(self, kind: str, text: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.every) >= self.every:
            self._last[kind] = now
            log.warning("%s", text)
        else:
            log.debug("%s", text)


_REFUSALS = _RateLimitedLog()


class Reservation:
    """What one message being received holds of an :class:`InboundBudget`."""

    __slots__ = ("held", "ticket")

    def __init__(self, ticket: int) -> None:
        self.ticket = ticket  # messages that started earlier have smaller tickets
        self.held = 0


class InboundBudget:
    """A server-wide budget of inbound bytes being received at once.

    A reader takes each piece of a message from the budget before reading it (so a peer
    that announces a large message and sends nothing holds nothing) and gives the whole
    message back when it is complete. When the budget is spent, an authenticated peer is
    simply not read from until room frees up (TCP backpressure: its sends block), and a
    peer that hasn't authenticated is refused instead.

    Readers waiting for room mid-message could wait for each other forever; when every
    reader holding a part of the budget waits, the one whose message started first goes
    on. So memory stays within ``total`` plus one message of the largest size (plus up to
    :data:`SMALL_MESSAGE` per connection: small messages don't use the budget, so they
    keep flowing while large ones wait). A reader whose peer sends nothing for the
    channel's ``stall_timeout`` while holding a part is dropped, which gives it back: a
    stalled peer holds the budget for a bounded time, not forever.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.refused = 0  # pieces refused to peers that have not authenticated
        self.waits = 0  # times an authenticated reader had to wait for room
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._holders = 0  # messages holding a part of the budget
        self._stuck: list[Reservation] = []  # of those, the ones waiting for more

    def start(self) -> Reservation:
        """A new message, holding nothing yet."""
        return Reservation(next(self._tickets))

    def take(self, res: Reservation, n: int, *, wait: bool) -> bool:
        """Add ``n`` bytes to ``res``; False if they can't be had now and ``wait`` is off.
        With ``wait``, blocks until they can (see the class docstring)."""
        with self._cond:
            if self.used + n > self.total:
                if not wait:
                    self.refused += 1
                    return False
                self.waits += 1
                if res.held:
                    self._stuck.append(res)
                    self._cond.notify_all()  # perhaps every holder waits now
                try:
                    self._cond.wait_for(lambda: self.used + n <= self.total
                                        or self._goes_first(res))
                finally:
                    if res.held:
                        self._stuck.remove(res)
            if not res.held:
                self._holders += 1
            res.held += n
            self.used += n
            return True

    def _goes_first(self, res: Reservation) -> bool:
        stuck = self._stuck
        return bool(res.held) and len(stuck) == self._holders \
            and res.ticket == min(r.ticket for r in stuck)

    def finish(self, res: Reservation) -> None:
        """The message is complete (or abandoned): give back all it held."""
        if res.held:
            with self._cond:
                self.used -= res.held
                self._holders -= 1
                res.held = 0
                self._cond.notify_all()


def read_in_pieces(read_piece: Callable[[int], bytearray], count: int, chunk: int) -> bytes:
    """``count`` bytes read with ``read_piece(n)`` (which returns exactly ``n`` bytes) at
    most ``chunk`` at a time, so memory is taken as the bytes arrive, never for a whole
    announced length up front. Shared by the socket and pipe streams."""
    if count <= chunk:
        return bytes(read_piece(count))
    pieces = []
    left = count
    while left:
        piece = read_piece(min(left, chunk))
        pieces.append(piece)
        left -= len(piece)
    return b"".join(pieces)  # brine slices it: it must be bytes


def tune_socket(sock: socket.socket) -> None:
    """Low latency for small messages, large buffers for bulk transfers."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


class DeadlineExceeded(EOFError):
    """A stream's deadline passed while it waited for bytes (see ``set_deadline``)."""


class PeerStalled(EOFError):
    """No byte arrived for ``idle_limit`` seconds in the middle of a message."""


#: The most bytes given to one ``sendall``: Python 3.9's ``SSLSocket`` refuses a write over
#: 2 GiB - 1 (``OverflowError``), and messages may be up to 4 GiB - 1.
_SEND_MAX = 1 << 30

#: How often a read with a deadline wakes up to look at the clock (seconds).
_DEADLINE_TICK = 0.25


class FastSocketStream(SocketStream):
    """A ``SocketStream`` with linear-time writes, one-copy reads and ``TCP_NODELAY``."""

    MAX_IO_CHUNK = _CHUNK
    #: While set (a ``time.monotonic()`` time), a read blocked past it fails with
    #: :class:`DeadlineExceeded`: how long a peer that hasn't authenticated gets to finish
    #: its first request (see :meth:`set_deadline`).
    deadline: float | None = None
    #: While set (seconds), a read that gets no byte for that long fails with
    #: :class:`PeerStalled` (a peer stalled mid-message while holding inbound budget).
    idle_limit: float | None = None

    def __init__(self, sock: socket.socket, prefix: bytes = b"") -> None:
        super().__init__(sock)
        tune_socket(sock)
        self._prefix = prefix  # bytes the handshake read that belong to the stream
        # When bytes last arrived (time.monotonic()): a client's liveness check reads it, so
        # a long transfer counts as a sign of life even before its message is complete.
        self.last_activity = time.monotonic()

    def poll(self, timeout: Any) -> bool:
        return bool(self._prefix) or super().poll(timeout)

    def set_deadline(self, deadline: float | None) -> None:
        """Reads give up at ``deadline`` (None: never). A short timeout on the socket wakes a
        blocked read now and then to look at the clock."""
        self.deadline = deadline
        self.sock.settimeout(None if deadline is None else _DEADLINE_TICK)

    def read(self, count: int) -> bytes:
        """``count`` bytes. Memory is taken as the bytes arrive (a piece of at most 1 MiB
        at a time), never for the whole announced length up front: a peer that announces
        gigabytes and sends nothing costs one piece."""
        return read_in_pieces(self._read_piece, count, _CHUNK)

    def read_buffer(self, count: int) -> bytearray:
        """``count`` bytes (at most 1 MiB, read at once) in a new bytearray."""
        return self._read_piece(count)

    def _read_piece(self, count: int) -> bytearray:
        buf = bytearray(count)
        self.read_into(memoryview(buf))
        return buf

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` (a writable byte view) with the next ``len(view)`` bytes."""
        count = len(view)
        got = 0
        if self._prefix:
            got = min(count, len(self._prefix))
            view[:got] = self._prefix[:got]
            self._prefix = self._prefix[got:]
        while got < count:
            if self.idle_limit is not None and self.deadline is None:
                self._wait_readable(self.idle_limit)
            try:
                n = self.sock.recv_into(view[got:], count - got)
            except socket.timeout:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise DeadlineExceeded("the peer did not finish its first request "
                                           "in time") from None
                continue
            except OSError as exc:
                self.close()
                raise EOFError(exc) from exc
            if n == 0:
                self.close()
                raise EOFError("connection closed by peer")
            got += n
            self.last_activity = time.monotonic()
        TRAFFIC["in"] += count

    def _wait_readable(self, limit: float) -> None:
        """Return once a byte can be read; :class:`PeerStalled` if none comes in ``limit``
        seconds. (Polled rather than a socket timeout, which would bound the concurrent
        ``sendall`` of a reply on the same socket as well.)"""
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return  # decrypted TLS bytes already buffered
        try:
            ready = super().poll(limit)
        except Exception as exc:  # closed under us
            self.close()
            raise EOFError(exc) from exc
        if not ready:
            raise PeerStalled(f"sent nothing for {limit:g} s in the middle of a message")

    def write(self, data: Any) -> None:
        try:
            if len(data) <= _SEND_MAX:
                self.sock.sendall(data)
            else:  # in pieces of a view: one SSL write takes at most 2 GiB - 1 on 3.9
                view = memoryview(data).cast("B")
                for start in range(0, len(view), _SEND_MAX):
                    self.sock.sendall(view[start:start + _SEND_MAX])
            TRAFFIC["out"] += len(data)
        except OSError as exc:
            self.close()
            raise EOFError(exc) from exc


class FastChannel(Channel):
    """A ``Channel`` that sends uncompressed frames, reads without extra copies, and bounds
    what a peer can make it allocate.

    ``limit`` is the largest frame accepted now; ``max_message`` the largest once the peer
    is trusted (:meth:`trust`); ``budget`` (a server's :class:`InboundBudget`) is reserved
    for every frame while it is read. A client's channel has none of these limits beyond
    what the frame header can say (it trusts its server with pickles anyway).
    """

    def __init__(self, stream: Any, compress: bool = False, *, limit: int = WIRE_MAX,
                 max_message: int | None = None, budget: InboundBudget | None = None,
                 deadline: float | None = None,
                 stall_timeout: float | None = DEFAULT_STALL_TIMEOUT) -> None:
        super().__init__(stream, compress=False)
        #: gets this connection's task messages (see rpycsvc.protocol.taskframes); None: refused
        self.task_handler: taskframes.TaskHandler | None = None
        self.limit = limit
        self.max_message = limit if max_message is None else max_message
        self.budget = budget
        # A peer that holds budget mid-message and sends nothing for this long is dropped.
        self.stall_timeout = stall_timeout
        self.trusted = limit >= self.max_message
        # Until trusted, a peer has until ``deadline`` to finish its first request: one
        # that says a byte and stalls would otherwise hold a thread and a descriptor.
        if deadline is not None and not self.trusted:
            stream.set_deadline(deadline)

    def trust(self) -> None:
        """The peer authenticated or proved it speaks the protocol: full-size messages,
        and no deadline."""
        self.limit = self.max_message
        self.trusted = True
        if getattr(self.stream, "deadline", None) is not None:
            self.stream.set_deadline(None)

    def poll(self, timeout: Any) -> bool:
        deadline = getattr(self.stream, "deadline", None)
        if deadline is None:
            return bool(self.stream.poll(timeout))
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._refuse("slow", "no complete first request within the handshake "
                               "timeout (--handshake-timeout)")
        wait = Timeout(timeout).timeleft()
        return bool(self.stream.poll(left if wait is None else min(wait, left)))

    def _refuse(self, kind: str, text: str) -> EOFError:
        """Close the connection over a limit: log why (RPyC swallows the ``EOFError``)."""
        try:
            host, port = self.stream.sock.getpeername()[:2]
            peer = f"{host}:{port}"
        except (OSError, AttributeError, EOFError):
            peer = "a peer"
        _REFUSALS.log(kind, f"dropped {peer}: {text}")
        self.stream.close()
        return EOFError(text)

    def recv(self) -> bytes:
        try:
            return self._recv()
        except DeadlineExceeded:
            raise self._refuse("slow", "no complete first request within the handshake "
                               "timeout (--handshake-timeout)") from None
        except PeerStalled as exc:
            held = exc.args[1] if len(exc.args) > 1 else "some"
            raise self._refuse("stalled", f"{exc.args[0]} while holding {held} bytes "
                               "of the inbound budget (--inbound-budget); closing, which "
                               f"frees them for the others (bound: {STALL_SETTING})") from None

    def _recv(self) -> bytes:
        header = self.stream.read(self.FRAME_HEADER.size)
        length, compressed = self.FRAME_HEADER.unpack(header)
        if compressed == taskframes.TASK_FLAG:
            self._recv_task(length)
            return b""  # RPyC reads an empty frame as "nothing arrived"
        if length > self.limit:
            if self.trusted:
                answer = self._skip_request(length, compressed)
                if answer is not None:
                    return answer
                raise self._refuse("size", f"peer announced a {length}-byte frame, over the "
                                   f"limit of {self.limit} bytes ({MESSAGE_SETTING}); closing")
            raise self._refuse("preauth", f"peer announced a {length}-byte frame before "
                               f"authenticating (limit {self.limit} bytes until it has); "
                               "closing")
        budget = self.budget
        if budget is None or length <= SMALL_MESSAGE:
            # small messages never wait for the budget (see SMALL_MESSAGE)
            data = self.stream.read(length)
            self.stream.read(len(self.FLUSHER))
            if not compressed:
                return data
            if budget is None:
                return self._decompress(data, None)
            res = budget.start()
            try:  # what it inflates to past SMALL_MESSAGE is taken from the budget
                return self._decompress(data, res, free=SMALL_MESSAGE)
            finally:
                budget.finish(res)
        res = budget.start()
        read = getattr(self.stream, "read_buffer", self.stream.read)
        try:
            pieces = []
            left = length
            while left:  # each piece is taken from the budget before it is read
                n = min(left, _CHUNK)
                self._take(res, n)
                pieces.append(self._read_holding(read, n, res))
                left -= n
            self._read_holding(self.stream.read, len(self.FLUSHER), res)
            data = b"".join(pieces)  # (brine slices it: it must be bytes)
            del pieces
            return self._decompress(data, res) if compressed else data
        finally:
            budget.finish(res)

    def _recv_task(self, length: int) -> None:
        """Read one task message (see :mod:`rpycsvc.protocol.taskframes`) and hand it to
        ``task_handler``. Over ``max_message`` in all, its frames are read and dropped a
        piece at a time (nothing kept) and the handler is told why: that task fails alone,
        the connection stays."""
        handler = self.task_handler
        if handler is None or not self.trusted:
            raise self._refuse("task", "a task message from a peer that has not said the "
                               "rpycsvc hello (only rpycsvc clients send them); closing")
        if length > taskframes.MAX_INLINE:
            raise self._refuse("size", f"a task message announced {length} inline bytes "
                               f"(at most {taskframes.MAX_INLINE}); closing")
        # (no stall bound for the inline part: it holds no budget, and it is small)
        inline = getattr(self.stream, "read_buffer", self.stream.read)(length)  # ≤ 1 MiB
        try:
            control, lens, frames = taskframes.parse_inline(inline)
        except Exception as exc:  # ValueError, UnpicklingError, and what garbage raises
            raise self._refuse("corrupt", f"a corrupt task message ({type(exc).__name__}: "
                               f"{exc}); closing") from None
        del inline
        if frames or not lens:
            self._hand_over(handler, control, frames)
            return
        sizes = [n & ~taskframes.READONLY for n in lens]
        total = length + sum(sizes)
        if total > self.max_message:
            read = getattr(self.stream, "read_buffer", self.stream.read)
            if control is None:  # the control part is the first frame: read it for the key
                control = ("?",)
                if sizes[0] <= taskframes.MAX_CONTROL_FRAME:
                    first = bytes(self._read_idle_bounded(self.stream.read, sizes[0]))
                    control = self._load_control(first)
                    sizes = sizes[1:]
            for size in sizes:
                while size:
                    n = min(size, _CHUNK)
                    self._read_idle_bounded(read, n)
                    size -= n
            handler.on_task_refused(control, too_large_message(
                "data", total, self.max_message))
            return
        budget = self.budget
        res = budget.start() if budget is not None else None
        try:
            for flagged, size in zip(lens, sizes):
                buf = taskframes.new_buffer(size)
                view = memoryview(buf)
                at = 0
                while at < size:
                    n = min(size - at, taskframes.PIECE)
                    if res is not None:
                        self._take(res, n)
                    piece = view[at:at + n]
                    if res is not None:
                        self._read_holding(lambda _n, p=piece: self._fill(p), n, res)
                    else:
                        self._read_idle_bounded(lambda _n, p=piece: self._fill(p), n)
                    at += n
                frames.append(view.toreadonly() if flagged & taskframes.READONLY else buf)
                del view
        finally:
            if budget is not None and res is not None:
                budget.finish(res)
        self._hand_over(handler, control, frames)

    def _hand_over(self, handler: Any, control: tuple[Any, ...] | None,
                   frames: list[Any]) -> None:
        if control is None:  # sent as the first frame (a large control part)
            control = self._load_control(frames.pop(0))
        handler.on_task(control, frames)

    def _load_control(self, data: Any) -> tuple[Any, ...]:
        try:
            return taskframes.load_control(data)
        except Exception as exc:
            raise self._refuse("corrupt", f"a corrupt task message ({type(exc).__name__}: "
                               f"{exc}); closing") from None

    def _fill(self, view: memoryview) -> None:
        """Fill ``view`` from the stream: in place where the stream can, else by copy."""
        read_into = getattr(self.stream, "read_into", None)
        if read_into is not None:
            read_into(view)
        else:
            view[:] = self.stream.read(len(view))

    def _read_holding(self, read: Any, n: int, res: Reservation) -> Any:
        """``read(n)`` while ``res`` holds budget: a peer that sends nothing for
        ``stall_timeout`` seconds meanwhile is dropped (:class:`PeerStalled`). Not while
        this reader waits for budget: that is not the peer's fault."""
        try:
            return self._read_idle_bounded(read, n)
        except PeerStalled as exc:
            raise PeerStalled(str(exc), res.held) from None

    def _skip_request(self, length: int, compressed: int) -> bytes | None:
        """A request over the limit from a trusted peer: read its first bytes for its
        sequence number, discard the rest a piece at a time (nothing is kept, nothing is
        taken from the budget), and return in its place a request that the
        :class:`ServerConnection` answers with :class:`MessageTooLargeError`: the caller
        gets an error naming the limit, and the connection stays up. None if it isn't a
        request (a reply can't be refused that way: the connection is dropped)."""
        head = bytes(self.stream.read(min(length, 4096)))
        seq = _request_seq(head, bool(compressed))
        if seq is None:
            return None
        left = length - len(head)
        while left:
            n = min(left, _CHUNK)
            self._read_idle_bounded(getattr(self.stream, "read_buffer", self.stream.read), n)
            left -= n
        self._read_idle_bounded(self.stream.read, len(self.FLUSHER))
        text = (f"this request ({length} bytes{', compressed' if compressed else ''}) is "
                f"over the server's message limit of {format_size(self.limit)} "
                f"({self.limit} bytes, set by {MESSAGE_SETTING}); it was not run and the "
                "connection is unharmed. Raise the limit on the server, or send less at "
                "once (split the data, or have the server read it from elsewhere)")
        _REFUSALS.log("size", f"refused a {length}-byte request over the limit of "
                      f"{self.limit} bytes ({MESSAGE_SETTING}); answered with "
                      "MessageTooLargeError")
        return brine.I1.pack(consts.MSG_REQUEST) + brine.dump((seq, (HANDLE_TOO_LARGE, text)))

    def _read_idle_bounded(self, read: Any, n: int) -> Any:
        """``read(n)``, dropping a peer that sends nothing for ``stall_timeout``."""
        stream = self.stream
        if self.stall_timeout is None or not hasattr(stream, "idle_limit"):
            return read(n)
        stream.idle_limit = self.stall_timeout
        try:
            return read(n)
        finally:
            stream.idle_limit = None

    def _take(self, res: Reservation, n: int) -> None:
        assert self.budget is not None
        if not self.budget.take(res, n, wait=self.trusted):
            raise self._refuse("budget", "refused a frame from a peer that has not "
                               "authenticated: the server's inbound budget (--inbound-budget) "
                               "is in use")

    def _decompress(self, data: bytes, res: Reservation | None, free: int = 0) -> bytes:
        """Inflate a frame from a plain RPyC peer (which compresses frames over 3 KB) a
        piece at a time, never past ``limit``, each piece past the first ``free`` bytes
        taken from the budget."""
        inflater = zlib.decompressobj()
        pieces: list[bytes] = []
        size = 0
        while True:
            want = min(_CHUNK, self.limit - size + 1)  # one byte past the limit is enough
            if res is not None and size + want > free:
                self._take(res, want)
            try:
                piece = inflater.decompress(data, want)
                data = inflater.unconsumed_tail
                tail = b"" if data else inflater.flush()
            except zlib.error as exc:
                raise self._refuse("corrupt", f"corrupt compressed frame: {exc}") from None
            size += len(piece) + len(tail)
            if size > self.limit:
                setting = MESSAGE_SETTING if self.trusted else "before authenticating"
                raise self._refuse("inflate", f"a compressed frame inflates past {self.limit} "
                                   f"bytes ({setting}); closing")
            pieces.append(piece)
            if not data:
                pieces.append(tail)
                return b"".join(pieces)

    def send(self, data: Any) -> None:
        if type(data) is taskframes.TaskMessage:  # queued by taskframes.send_task
            data.write_to(self.stream)
            return
        header = self.FRAME_HEADER.pack(len(data), 0)
        if len(data) < 65536:
            self.stream.write(header + data + self.FLUSHER)
        else:
            self.stream.write(header)
            self.stream.write(data)
            self.stream.write(self.FLUSHER)


#: A request handler number RPyC doesn't use: the :class:`FastChannel` puts it in place of
#: a request over the message limit (its argument is the error text), and the
#: :class:`ServerConnection` answers it with :class:`MessageTooLargeError`.
HANDLE_TOO_LARGE = 250


def _request_seq(head: bytes, compressed: bool) -> int | None:
    """The sequence number of an RPyC request from the first bytes of its frame (a
    message type byte, then brine's ``(seq, args)``), or None if it isn't a request."""
    if compressed:
        try:
            head = zlib.decompressobj().decompress(head, 64)
        except zlib.error:
            return None
    if len(head) < 3 or head[0] != consts.MSG_REQUEST or head[1:2] != brine.TAG_TUP2:
        return None
    end = 3
    if head[2:3] == brine.TAG_INT_L1:
        if len(head) < 4:
            return None
        end = 4 + head[3]
    if len(head) < end:
        return None
    try:
        seq = brine.load(head[2:end])
    except Exception:
        return None
    return seq if type(seq) is int else None


class Deferred:
    """A reply to be sent later. Return one from an exposed method of the rpycsvc service."""

    __slots__ = ("_conn", "_lock", "_outcome", "_seq")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: ServerConnection | None = None
        self._seq = 0
        self._outcome: tuple[bool, Any] | None = None

    def _bind(self, conn: ServerConnection, seq: int) -> None:
        with self._lock:
            self._conn, self._seq = conn, seq
            outcome = self._outcome
        if outcome is not None:
            conn._queue_reply(self, outcome)

    def resolve(self, value: Any) -> None:
        """Reply with ``value`` (boxed like any RPyC return value)."""
        self._settle((True, value))

    def fail(self, exc: BaseException) -> None:
        """Reply by raising ``exc`` in the caller."""
        self._settle((False, exc))

    def _settle(self, outcome: tuple[bool, Any]) -> None:
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = outcome
            bound = self._conn is not None
        if bound:
            conn = self._conn
            assert conn is not None
            conn._queue_reply(self, outcome)

    def _send(self, outcome: tuple[bool, Any]) -> None:
        """Box and send the reply (in the connection's reply sender thread)."""
        conn = self._conn
        assert conn is not None
        if conn.closed:
            return
        ok, value = _fit(outcome, getattr(conn._channel, "max_message", None))
        try:
            if ok:
                conn._send(consts.MSG_REPLY, self._seq, conn._box(value))
            else:
                conn._send(
                    consts.MSG_EXCEPTION, self._seq, conn._box_exc(type(value), value, None)
                )
        except (EOFError, OSError, ValueError, RuntimeError):
            # the client is gone (RuntimeError: rpyc's cleanup released its send lock under
            # us); nobody is waiting for this reply
            pass


def _fit(outcome: tuple[bool, Any], limit: Any) -> tuple[bool, Any]:
    """``outcome``, or in its place a :class:`MessageTooLargeError` if the reply would be
    over the message limit: the sender checks, so only this call fails, and the peer never
    sees a frame it would have to drop the connection for."""
    value = outcome[1]
    text = oversize(value, limit, "reply")
    if text is None:
        return outcome
    return False, MessageTooLargeError(text)


#: The connection whose request this thread is serving (for per-connection stdout).
CURRENT = threading.local()


class SendRaceSafe(Connection):
    """RPyC's ``_send`` without its race with ``_cleanup``.

    When a connection dies while one thread is sending a large message, the thread that
    reads the connection sees EOF first and runs RPyC's ``_cleanup``, which *releases the
    send lock the sender still holds*; the sender's own release then raises ``RuntimeError:
    release unlocked lock``, which hides the real cause (the peer is gone) from the caller.
    Here that error, on a connection that has closed, is reported as the ``EOFError`` it
    stands for (callers already turn ``EOFError`` into ``ServerLostError``)."""

    def _send(self, msg: int, seq: int, args: Any) -> None:
        try:
            super()._send(msg, seq, args)
        except RuntimeError as exc:
            if not self.closed:
                raise
            raise self._lost_while_sending() from exc

    def _lost_while_sending(self) -> BaseException:
        return EOFError("the connection closed while a message was being sent")


class ServerConnection(SendRaceSafe):
    """An RPyC connection whose exposed methods may answer later via :class:`Deferred`.

    Deferred replies are sent by a thread of this connection's own (started with the
    first one), never by the thread that resolves them: that is often a thread shared by
    all clients (the worker pool's reader), and a client that doesn't read (frozen, or on
    a dead link) would block it in ``sendall`` and stop every other client's results.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._replies: queue.SimpleQueue[tuple[Deferred, tuple[bool, Any]] | None] = \
            queue.SimpleQueue()
        self._reply_lock = threading.Lock()
        self._reply_thread: threading.Thread | None = None
        super().__init__(*args, **kwargs)

    def _queue_reply(self, deferred: Deferred, outcome: tuple[bool, Any]) -> None:
        """Have the reply sender send ``deferred``'s reply; returns at once."""
        with self._reply_lock:
            if self._reply_thread is None:
                if self.closed:
                    return  # nobody is waiting for it
                self._reply_thread = threading.Thread(
                    target=self._send_replies, name="rpycsvc-replies", daemon=True)
                self._reply_thread.start()
        self._replies.put((deferred, outcome))

    def _send_replies(self) -> None:
        replies = self._replies
        while True:
            item = replies.get()
            if item is None or self.closed:
                return
            deferred, outcome = item
            del item
            try:
                deferred._send(outcome)
            except Exception:  # one reply that can't be boxed must not stop the others
                log.exception("could not send a reply")
            del deferred, outcome  # a large result is freed as soon as it is sent

    def _cleanup(self, _anyway: bool = True) -> None:
        try:
            super()._cleanup(_anyway)
        finally:
            self._replies.put(None)  # ends the reply sender (closing woke a blocked send)

    def _dispatch_request(self, seq: int, raw_args: Any) -> None:
        # A well-formed request: a plain RPyC peer on a server without authkey has now said
        # its hello, so its messages may be full-size from here on.
        channel = self._channel
        if not getattr(channel, "trusted", True):
            channel.trust()
        outer = getattr(CURRENT, "conn", None)
        CURRENT.conn = self
        try:
            self._dispatch_request_here(seq, raw_args)
        finally:
            CURRENT.conn = outer

    def _dispatch_request_here(self, seq: int, raw_args: Any) -> None:
        try:
            handler, args = raw_args
            if handler == HANDLE_TOO_LARGE:  # put in place of a request over the limit
                raise MessageTooLargeError(str(args))
            args = self._unbox(args)
            res = self._HANDLERS[handler](self, *args)
        except BaseException:
            t, v, tb = sys.exc_info()
            self._last_traceback = tb
            if t is SystemExit and self._config["propagate_SystemExit_locally"]:
                raise
            if t is KeyboardInterrupt and self._config["propagate_KeyboardInterrupt_locally"]:
                raise
            self._send(consts.MSG_EXCEPTION, seq, self._box_exc(t, v, tb))
        else:
            if isinstance(res, Deferred):
                res._bind(self, seq)
            else:
                self._send(consts.MSG_REPLY, seq, self._box(res))
