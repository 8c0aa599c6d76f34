"""The socket stream under rpycsvc's connections: linear-time writes, one-copy reads,
``TCP_NODELAY``, and the deadline and stall bound a server puts on a peer's reads.

Why (measured on RPyC 6.0.2, see shared/research/rpyc-facts.md): ``SocketStream.write``
re-slices the remaining bytes after every 64 KB send, which is quadratic: 64 MiB took ~20 s.
:class:`FastSocketStream` sends through a ``memoryview`` and receives with ``recv_into``
into one buffer; it also sets ``TCP_NODELAY``, without which small replies stall on Nagle +
delayed ACK. The pipe streams (:mod:`rpycsvc.protocol.pipes`) share its piecewise reads and
its traffic counter.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

from rpyc.core.stream import SocketStream

#: Bytes read at once: memory for a message is taken a piece of this size at a time.
CHUNK = 1 << 20
#: A read of fewer bytes than this takes what has arrived, up to this much, in one recv and
#: keeps the rest for the next reads (a small message's header and body in one syscall).
#: Small on purpose: the recv's buffer is allocated per read, and larger ones left more
#: memory behind in the allocator per connection thread (per idle connection, measured:
#: 34 KiB without read-ahead, 61 KiB with 64 KiB, 49 KiB with 16 KiB).
READ_AHEAD = 16 << 10

#: Bytes this process received and sent on rpycsvc streams (for metrics; approximate).
TRAFFIC = {"in": 0, "out": 0}


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

    MAX_IO_CHUNK = CHUNK
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
        # Bytes read ahead and not yet consumed (from ``_pos``): first what the handshake
        # read that belongs to the stream, then what a small read got beyond its count
        # (see read_into: one recv per small message instead of one per part of it).
        self._ahead = bytearray(prefix)
        self._pos = 0
        # When bytes last arrived (time.monotonic()): a client's liveness check reads it, so
        # a long transfer counts as a sign of life even before its message is complete.
        self.last_activity = time.monotonic()

    def buffered(self) -> int:
        """Bytes read from the socket and not yet consumed (a poll must not wait for them)."""
        return len(self._ahead) - self._pos

    def poll(self, timeout: Any) -> bool:
        return self._pos < len(self._ahead) or super().poll(timeout)

    def set_deadline(self, deadline: float | None) -> None:
        """Reads give up at ``deadline`` (None: never). A short timeout on the socket wakes a
        blocked read now and then to look at the clock."""
        self.deadline = deadline
        self.sock.settimeout(None if deadline is None else _DEADLINE_TICK)

    def read(self, count: int) -> bytes:
        """``count`` bytes. Memory is taken as the bytes arrive (a piece of at most 1 MiB
        at a time), never for the whole announced length up front: a peer that announces
        gigabytes and sends nothing costs one piece."""
        if len(self._ahead) - self._pos >= count:  # read ahead already: no syscall
            return self._from_ahead(count, bytes)
        return read_in_pieces(self._read_piece, count, CHUNK)

    def read_buffer(self, count: int) -> bytearray:
        """``count`` bytes (at most 1 MiB, read at once) in a new bytearray."""
        if len(self._ahead) - self._pos >= count:
            return self._from_ahead(count, bytearray)
        return self._read_piece(count)

    def _from_ahead(self, count: int, kind: Any) -> Any:
        """The next ``count`` bytes, all read ahead already, as a ``kind`` (one copy)."""
        ahead = self._ahead
        pos = self._pos
        end = pos + count
        data = kind(memoryview(ahead)[pos:end])
        if end == len(ahead):
            ahead.clear()
            end = 0
        self._pos = end
        TRAFFIC["in"] += count
        return data

    def _read_piece(self, count: int) -> bytearray:
        buf = bytearray(count)
        self.read_into(memoryview(buf))
        return buf

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` (a writable byte view) with the next ``len(view)`` bytes."""
        count = len(view)
        got = 0
        ahead = self._ahead
        if self._pos < len(ahead):
            pos = self._pos
            got = min(count, len(ahead) - pos)
            view[:got] = memoryview(ahead)[pos:pos + got]
            pos += got
            if pos == len(ahead):
                ahead.clear()
                pos = 0
            self._pos = pos
        while got < count:
            if self.idle_limit is not None and self.deadline is None:
                self._wait_readable(self.idle_limit)
            want = count - got
            try:
                if want < READ_AHEAD:
                    # small: take whatever has arrived (up to READ_AHEAD), keep the rest.
                    # (recv, not a scratch buffer of the stream's own: that would cost
                    # every connection, idle ones too, READ_AHEAD bytes for good)
                    data = self.sock.recv(READ_AHEAD)
                    n = len(data)
                    if n > want:
                        view[got:count] = memoryview(data)[:want]
                        self._ahead[:] = memoryview(data)[want:]  # (empty: consumed above)
                        self._pos = 0
                        got = count
                        self.last_activity = time.monotonic()
                        break
                    if n:
                        view[got:got + n] = data
                else:
                    n = self.sock.recv_into(view[got:], want)
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
