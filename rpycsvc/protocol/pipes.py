"""A linear-time RPyC stream over a pair of pipes (the ssh session of a deployed server).

RPyC's ``PipeStream.write`` re-slices the remaining ``bytes`` after every 64,000-byte
``os.write``: each slice copies what is left, so a message of ``n`` bytes costs about
``n * n / 128,000`` bytes of copying (a 64 MiB argument took over 10 s, and the deployed
server's keepalive gave up meanwhile). Its ``read`` joins 64,000-byte pieces. And neither
says when bytes last moved, so a liveness check could only count *complete* messages: a
64 MiB message in progress looked like silence.

:class:`FastPipeStream` writes from ``memoryview`` slices (no copies), reads into buffers
allocated once per piece, asks the kernel for larger pipe buffers where it can (Linux), and
notes ``last_activity`` (``time.monotonic()``) whenever bytes arrive, like
:class:`~rpycsvc.protocol.socket_stream.FastSocketStream`: both sides' liveness checks read it, so a
transfer in progress is never taken for a dead peer.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import struct
import sys
import time
from typing import Any

from rpyc.core.stream import PipeStream, SocketStream

try:
    import fcntl
    import termios
except ImportError:  # pragma: no cover - not POSIX: plain blocking writes
    fcntl = termios = None  # type: ignore[assignment]

from rpycsvc.protocol.socket_stream import TRAFFIC, read_in_pieces

#: Bytes per read or write system call, and the size of a piece a read allocates at once.
CHUNK = 1 << 20
#: The pipe buffer asked for (Linux ``F_SETPIPE_SZ``; the default is 64 KiB, and every
#: 64 KiB the writer and reader would otherwise take turns). Capped by
#: ``/proc/sys/fs/pipe-max-size`` for unprivileged users (1 MiB by default); a refusal is
#: harmless.
PIPE_BUFFER = 1 << 20

_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (named in the fcntl module from Python 3.10)
_F_GETPIPE_SZ = 1032
#: How often a write waiting for room in a full pipe looks whether it should give up.
ABORT_TICK = 0.5
#: A pipe with less room than this counts as full (see FastPipeStream.unread): more than
#: a keepalive ping takes.
_ROOM_FOR_A_PING = 4096


def enlarge_pipe(fd: int, size: int = PIPE_BUFFER) -> None:
    """Ask for a pipe buffer of ``size`` bytes on ``fd`` (Linux only; best effort)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", _F_SETPIPE_SZ), size)
    except (OSError, ValueError, ImportError):
        pass  # not a pipe (a file, a pty), or over the user's limit: keep what it has


class FastPipeStream(PipeStream):
    """A ``PipeStream`` with linear-time writes, one-copy reads and ``last_activity``."""

    MAX_IO_CHUNK = CHUNK

    def __init__(self, incoming: Any, outgoing: Any) -> None:
        super().__init__(incoming, outgoing)
        # When bytes last arrived (time.monotonic()): read by the liveness checks, so a long
        # transfer is a sign of life before its message is complete.
        self.last_activity = time.monotonic()
        #: set by :meth:`abort`: a write waiting for room in the pipe gives up
        self.aborted = False
        #: a write is under way (close() waits for it to leave before closing the fd)
        self._writing = False
        for f in (incoming, outgoing):
            try:
                enlarge_pipe(f.fileno())
            except (OSError, ValueError, AttributeError):
                pass
        # The outgoing pipe's size, to write only what fits (None: not a pipe, or not Linux:
        # plain blocking writes). See write().
        self._pipe_size: int | None = None
        if fcntl is not None and sys.platform.startswith("linux"):
            try:
                self._pipe_size = fcntl.fcntl(outgoing.fileno(), _F_GETPIPE_SZ)
            except (OSError, ValueError, AttributeError):
                pass

    def abort(self) -> None:
        """Make a write that waits for the peer to read give up (``EOFError``) within
        :data:`ABORT_TICK` seconds: the peer is declared lost (a frozen host keeps its end
        of the pipe open, so the write would otherwise wait as long as it stays frozen)."""
        self.aborted = True

    def close(self) -> None:
        """Close both pipes. A write under way (waiting for room, for a frozen peer) gives
        up first: closing its descriptor under it would let the rest of its bytes go to
        whatever the process opens next under the same number."""
        self.aborted = True
        deadline = time.monotonic() + 2 * ABORT_TICK + 1.0
        while self._writing and time.monotonic() < deadline:
            time.sleep(0.01)
        super().close()

    def _room(self, fd: int, want: int) -> int:
        """How much of ``want`` bytes can be written to the pipe without blocking; waits
        (checking :attr:`aborted`) while it is full."""
        size = self._pipe_size
        if self.aborted:
            raise EOFError("the stream was closed, or its peer declared lost")
        if size is None:
            return min(want, CHUNK)
        while True:
            if self.aborted:
                raise EOFError("the peer was declared lost while a write waited for it")
            try:
                queued = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
            except OSError:
                return min(want, CHUNK)
            room = size - queued
            if room > 0:
                return min(want, room, CHUNK)
            select.select((), (fd,), (), ABORT_TICK)

    def unread(self) -> tuple[int, bool] | None:
        """Bytes waiting in the incoming pipe (or socket: some sshds give their sessions
        socketpairs), unread, and whether it is (nearly) full; None where that can't be
        told (not Linux, a file). A liveness check reads it: the peer's pings wait there
        while the serving thread is busy (a long classic call, a large task handed to a
        worker), so a count that grows, or a buffer too full to take more, is the peer
        speaking although :attr:`last_activity` is old (unless the peer closed its end:
        then a full buffer is only what it left)."""
        if fcntl is None or termios is None:
            return None
        try:
            fd = self.incoming.fileno()
            count = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except (OSError, ValueError):  # closed under us (its reader reports that), a file
            return None
        try:
            full = count >= fcntl.fcntl(fd, _F_GETPIPE_SZ) - _ROOM_FOR_A_PING
        except OSError:  # not a pipe. A socket's sender may be stopped by the kernel's
            # per-message overhead long before our count says full (some 278 small pings
            # on a Unix socket), so any unread byte counts as "full" there: a busy server
            # on a socket outlives a dead link until it reads again (a hang-up is still
            # seen below)
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    return None
            except OSError:
                return None
            full = count > 0
        if full:  # full because its writer is gone (hung up) is not the peer speaking
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN | getattr(select, "POLLRDHUP", 0))
                hangup = select.POLLHUP | getattr(select, "POLLRDHUP", 0)
                full = not any(ev & hangup for _, ev in poller.poll(0))
            except (OSError, ValueError, AttributeError):  # (no poll(): not Linux anyway)
                pass
        return count, full

    def read(self, count: int) -> bytes:
        """``count`` bytes. Memory is taken as they arrive (pieces of at most
        :data:`CHUNK`), never for a whole announced length up front."""
        return read_in_pieces(self._read_piece, count, CHUNK)

    def read_buffer(self, count: int) -> bytearray:
        """``count`` bytes (at most :data:`CHUNK`) in a new bytearray (no further copy)."""
        return self._read_piece(count)

    def _read_piece(self, count: int) -> bytearray:
        buf = bytearray(count)
        self.read_into(memoryview(buf))
        return buf

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` (a writable byte view) with the next ``len(view)`` bytes."""
        count = len(view)
        got = 0
        try:
            fd = self.incoming.fileno()
            while got < count:
                n = _read_into(fd, view[got:])
                if n == 0:
                    raise EOFError("connection closed by peer")
                got += n
                self.last_activity = time.monotonic()
        except EOFError:
            self.close()
            raise
        except (OSError, ValueError) as exc:  # ValueError: closed under us by another thread
            self.close()
            raise EOFError(exc) from exc
        TRAFFIC["in"] += count

    def write(self, data: Any) -> None:
        """All of ``data``, a :data:`CHUNK` at a time from a view of it (no copies)."""
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        self._writing = True
        try:
            fd = self.outgoing.fileno()
            total = len(view)
            sent = 0
            while sent < total:
                sent += os.write(fd, view[sent:sent + self._room(fd, total - sent)])
        except EOFError:
            self._writing = False
            self.close()
            raise
        except (OSError, ValueError) as exc:  # ValueError: closed under us
            self._writing = False
            self.close()
            raise EOFError(exc) from exc
        finally:
            self._writing = False
        TRAFFIC["out"] += total


if hasattr(os, "readv"):
    def _read_into(fd: int, view: memoryview) -> int:
        """Read up to ``len(view)`` (at most :data:`CHUNK`) bytes into ``view``."""
        return os.readv(fd, [view[:CHUNK]])
else:  # pragma: no cover - Windows has its own PipeStream in RPyC and no ssh pipes here
    def _read_into(fd: int, view: memoryview) -> int:
        data = os.read(fd, min(len(view), CHUNK))
        view[:len(data)] = data
        return len(data)


class ChannelStream(SocketStream):
    """RPyC's ``SocketStream`` over a socket-like ssh channel (paramiko's ``Channel``, for
    plumbum's ``ParamikoMachine``), with linear-time writes and ``last_activity``.

    ``SocketStream.write`` re-slices the remaining bytes after every send (quadratic, as in
    ``PipeStream``); here each send gets a piece of at most :data:`CHUNK` bytes of a view.
    (A ``bytes`` copy of the piece: a channel's ``send`` is not promised to take views.)"""

    MAX_IO_CHUNK = CHUNK

    def __init__(self, channel: Any) -> None:
        super().__init__(channel)
        self.last_activity = time.monotonic()

    def read(self, count: int) -> bytes:
        """``count`` bytes, noting ``last_activity`` as each piece arrives (a message in
        progress is a sign of life)."""
        pieces = []
        left = count
        try:
            while left:
                try:
                    piece = self.sock.recv(min(left, CHUNK))
                except socket.timeout:  # a timeout set on the channel: keep waiting
                    continue
                if not piece:
                    raise EOFError("connection closed by peer")
                pieces.append(piece)
                left -= len(piece)
                self.last_activity = time.monotonic()
        except EOFError:
            self.close()
            raise
        except (OSError, ValueError) as exc:
            self.close()
            raise EOFError(exc) from exc
        TRAFFIC["in"] += count
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def write(self, data: Any) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        total = len(view)
        sent = 0
        try:
            while sent < total:
                n = self.sock.send(bytes(view[sent:sent + CHUNK]))
                if n <= 0:
                    self.close()  # (the except below does not see an EOFError)
                    raise EOFError("the ssh channel is closed")
                sent += n
        except (OSError, ValueError) as exc:
            self.close()
            raise EOFError(exc) from exc
        TRAFFIC["out"] += total
