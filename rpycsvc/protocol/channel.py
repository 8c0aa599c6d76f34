"""The RPyC channel of rpycsvc's connections: frames sent uncompressed, and reads bounded by
the message limit, the inbound budget and a stall timeout (task messages are read with these
bounds by :mod:`rpycsvc.protocol.task_receive`).

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
)
from rpycsvc.protocol.socket_stream import CHUNK, DeadlineExceeded, PeerStalled
from rpycsvc.protocol.task_receive import recv_task

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
            if timeout is None or (isinstance(timeout, Timeout) and not timeout.finite):
                # RPyC's serve_all: nothing to do until a frame comes, so its read blocks
                # instead (one poll syscall fewer per message; a close wakes it alike)
                return True
            return bool(self.stream.poll(timeout))
        left = deadline - time.monotonic()
        if left <= 0:
            raise self.refuse("slow", "no complete first request within the handshake "
                              "timeout (--handshake-timeout)")
        wait = Timeout(timeout).timeleft()
        return bool(self.stream.poll(left if wait is None else min(wait, left)))

    def refuse(self, kind: str, text: str) -> EOFError:
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
            raise self.refuse("slow", "no complete first request within the handshake "
                              "timeout (--handshake-timeout)") from None
        except PeerStalled as exc:
            held = exc.args[1] if len(exc.args) > 1 else "some"
            raise self.refuse("stalled", f"{exc.args[0]} while holding {held} bytes "
                              "of the inbound budget (--inbound-budget); closing, which "
                              f"frees them for the others (bound: {STALL_SETTING})") from None

    def _recv(self) -> bytes:
        header = self.stream.read(self.FRAME_HEADER.size)
        length, compressed = self.FRAME_HEADER.unpack(header)
        if compressed == taskframes.TASK_FLAG:
            recv_task(self, length)
            return b""  # RPyC reads an empty frame as "nothing arrived"
        if length > self.limit:
            if self.trusted:
                answer = self._skip_request(length, compressed)
                if answer is not None:
                    return answer
                raise self.refuse("size", f"peer announced a {length}-byte frame, over the "
                                  f"limit of {self.limit} bytes ({MESSAGE_SETTING}); closing")
            raise self.refuse("preauth", f"peer announced a {length}-byte frame before "
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
                self.take(res, n)
                pieces.append(self.read_holding(read, n, res))
                left -= n
            self.read_holding(self.stream.read, len(self.FLUSHER), res)
            data = b"".join(pieces)  # (brine slices it: it must be bytes)
            del pieces
            return self._decompress(data, res) if compressed else data
        finally:
            budget.finish(res)

    def read_holding(self, read: Any, n: int, res: Reservation) -> Any:
        """``read(n)`` while ``res`` holds budget: a peer that sends nothing for
        ``stall_timeout`` seconds meanwhile is dropped (:class:`PeerStalled`). Not while
        this reader waits for budget: that is not the peer's fault."""
        try:
            return self.read_idle_bounded(read, n)
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
            self.read_idle_bounded(getattr(self.stream, "read_buffer", self.stream.read), n)
            left -= n
        self.read_idle_bounded(self.stream.read, len(self.FLUSHER))
        text = (f"this request ({length} bytes{', compressed' if compressed else ''}) is "
                f"over the server's message limit of {format_size(self.limit)} "
                f"({self.limit} bytes, set by {MESSAGE_SETTING}); it was not run and the "
                "connection is unharmed. Raise the limit on the server, or send less at "
                "once (split the data, or have the server read it from elsewhere)")
        _REFUSALS.log("size", f"refused a {length}-byte request over the limit of "
                      f"{self.limit} bytes ({MESSAGE_SETTING}); answered with "
                      "MessageTooLargeError")
        return brine.I1.pack(consts.MSG_REQUEST) + brine.dump((seq, (HANDLE_TOO_LARGE, text)))

    def read_idle_bounded(self, read: Any, n: int) -> Any:
        """``read(n)``, dropping a peer that sends nothing for ``stall_timeout``."""
        stream = self.stream
        if self.stall_timeout is None or not hasattr(stream, "idle_limit"):
            return read(n)
        stream.idle_limit = self.stall_timeout
        try:
            return read(n)
        finally:
            stream.idle_limit = None

    def take(self, res: Reservation, n: int) -> None:
        """Take ``n`` more bytes of the budget for ``res``: a trusted peer waits for room,
        one that has not authenticated is refused (and dropped)."""
        assert self.budget is not None
        if not self.budget.take(res, n, wait=self.trusted):
            raise self.refuse("budget", "refused a frame from a peer that has not "
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
                self.take(res, want)
            try:
                piece = inflater.decompress(data, want)
                data = inflater.unconsumed_tail
                tail = b"" if data else inflater.flush()
            except zlib.error as exc:
                raise self.refuse("corrupt", f"corrupt compressed frame: {exc}") from None
            size += len(piece) + len(tail)
            if size > self.limit:
                setting = MESSAGE_SETTING if self.trusted else "before authenticating"
                raise self.refuse("inflate", f"a compressed frame inflates past {self.limit} "
                                  f"bytes ({setting}); closing")
            pieces.append(piece)
            if not data:
                pieces.append(tail)
                return b"".join(pieces)

    def send(self, data: Any) -> None:
        if type(data) is taskframes.TaskMessage:  # queued by sending.send_task
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
