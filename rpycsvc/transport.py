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

import socket
import sys
import threading
import time
import zlib
from typing import Any

from rpyc.core import consts
from rpyc.core.channel import Channel
from rpyc.core.protocol import Connection
from rpyc.core.stream import SocketStream

_CHUNK = 1 << 20

#: Largest frame accepted from a peer; a bigger announced length closes the connection
#: instead of allocating it (RPyC's frame header allows 4 GiB).
MAX_FRAME = 1 << 30

#: Bytes this process received and sent on rpycsvc streams (for metrics; approximate).
TRAFFIC = {"in": 0, "out": 0}


def tune_socket(sock: socket.socket) -> None:
    """Low latency for small messages, large buffers for bulk transfers."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


class FastSocketStream(SocketStream):
    """A ``SocketStream`` with linear-time writes, one-copy reads and ``TCP_NODELAY``."""

    MAX_IO_CHUNK = _CHUNK

    def __init__(self, sock: socket.socket, prefix: bytes = b"") -> None:
        super().__init__(sock)
        tune_socket(sock)
        self._prefix = prefix  # bytes the handshake read that belong to the stream
        # When bytes last arrived (time.monotonic()): a client's liveness check reads it, so
        # a long transfer counts as a sign of life even before its message is complete.
        self.last_activity = time.monotonic()

    def poll(self, timeout: Any) -> bool:
        return bool(self._prefix) or super().poll(timeout)

    def read(self, count: int) -> bytes:
        buf = bytearray(count)
        view = memoryview(buf)
        got = 0
        if self._prefix:
            got = min(count, len(self._prefix))
            view[:got] = self._prefix[:got]
            self._prefix = self._prefix[got:]
        while got < count:
            try:
                n = self.sock.recv_into(view[got:], min(count - got, _CHUNK))
            except socket.timeout:
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
        return bytes(buf)  # brine slices it: it must be bytes

    def write(self, data: Any) -> None:
        try:
            self.sock.sendall(data)
            TRAFFIC["out"] += len(data)
        except OSError as exc:
            self.close()
            raise EOFError(exc) from exc


class FastChannel(Channel):
    """A ``Channel`` that sends uncompressed frames and reads without extra copies."""

    def __init__(self, stream: Any, compress: bool = False) -> None:
        super().__init__(stream, compress=False)

    def recv(self) -> bytes:
        header = self.stream.read(self.FRAME_HEADER.size)
        length, compressed = self.FRAME_HEADER.unpack(header)
        if length > MAX_FRAME:
            self.stream.close()
            raise EOFError(f"peer announced a {length}-byte frame (limit {MAX_FRAME}); closing")
        data = self.stream.read(length)
        self.stream.read(len(self.FLUSHER))
        return zlib.decompress(data) if compressed else data

    def send(self, data: bytes) -> None:
        header = self.FRAME_HEADER.pack(len(data), 0)
        if len(data) < 65536:
            self.stream.write(header + data + self.FLUSHER)
        else:
            self.stream.write(header)
            self.stream.write(data)
            self.stream.write(self.FLUSHER)


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
            self._send(outcome)

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
            self._send(outcome)

    def _send(self, outcome: tuple[bool, Any]) -> None:
        conn = self._conn
        assert conn is not None
        if conn.closed:
            return
        ok, value = outcome
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


#: The connection whose request this thread is serving (for per-connection stdout).
CURRENT = threading.local()


class ServerConnection(Connection):
    """An RPyC connection whose exposed methods may answer later via :class:`Deferred`."""

    def _dispatch_request(self, seq: int, raw_args: Any) -> None:
        outer = getattr(CURRENT, "conn", None)
        CURRENT.conn = self
        try:
            self._dispatch_request_here(seq, raw_args)
        finally:
            CURRENT.conn = outer

    def _dispatch_request_here(self, seq: int, raw_args: Any) -> None:
        try:
            handler, args = raw_args
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
