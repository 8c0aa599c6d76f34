"""The RPyC channel of rpycsvc's connections: frames sent uncompressed, and reads bounded by
the message limit, the inbound budget and a stall timeout; task messages are read here.

Why (measured on RPyC 6.0.2, see shared/research/rpyc-facts.md): ``Channel``
zlib-compresses every frame over 3 KB, which costs CPU and gains nothing on pickles of
numbers or random data; :class:`FastChannel` never compresses (it still reads compressed
frames from plain RPyC peers) and avoids copying the frame to strip its ``\\n``.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any

from rpyc.core import brine, consts
from rpyc.core.channel import Channel
from rpyc.lib import Timeout

from rpycsvc.protocol import taskframes
from rpycsvc.protocol.budget import InboundBudget, Reservation
from rpycsvc.protocol.limits import (
    DEFAULT_STALL_TIMEOUT,
    HANDLE_TOO_LARGE,
    MESSAGE_SETTING,
    SMALL_MESSAGE,
    STALL_SETTING,
    WIRE_MAX,
    format_size,
    too_large_message,
)
from rpycsvc.protocol.socket_stream import CHUNK, DeadlineExceeded, PeerStalled

log = logging.getLogger("rpycsvc.server")


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
                n = min(left, CHUNK)
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
                    n = min(size, CHUNK)
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
        :class:`~rpycsvc.protocol.rpyc_connection.ServerConnection` answers with
        :class:`~rpycsvc.errors.MessageTooLargeError`: the caller
        gets an error naming the limit, and the connection stays up. None if it isn't a
        request (a reply can't be refused that way: the connection is dropped)."""
        head = bytes(self.stream.read(min(length, 4096)))
        seq = _request_seq(head, bool(compressed))
        if seq is None:
            return None
        left = length - len(head)
        while left:
            n = min(left, CHUNK)
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
            want = min(CHUNK, self.limit - size + 1)  # one byte past the limit is enough
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
