"""Framing between the server process and its worker processes (a local socketpair).

A message is a small pickled control tuple plus zero or more binary frames (pickled task
data, out-of-band buffers). A fixed header says how many bytes follow it *inline* (the
frame lengths, the control tuple and, when they are small, the frames), so a small message
takes two reads: the header, then the rest. Large frames follow on their own, written
from the sender's buffers and read into one buffer each, so large arrays cross with no
extra copies. Both ends are ours (the server and the workers it started), so the control
tuple is a plain pickle.
"""

from __future__ import annotations

import mmap
import pickle
import socket
import struct
from typing import Any

from rpycsvc.protocol.taskframes import small_plain

_HEAD = struct.Struct("!IIQ")  # control length, number of frames, inline bytes after the head
#: Frames are sent inline (in the same write as the header) while their total is below this.
_INLINE = 65536
_LEN = struct.Struct("!Q")
_MAX_FRAMES = 1 << 16
#: Set in a frame's length: its source was read-only (``bytes``), so the receiver may
#: read it into an immutable ``bytes`` (one copy, no zero-filling) instead of a bytearray.
_READONLY = 1 << 63


def send_msg(sock: socket.socket, control: tuple[Any, ...], frames: Any = ()) -> None:
    """Send one message: ``control`` and ``frames`` (a sequence of buffers).

    Callers serialise concurrent senders with their own lock. Large frames are sent from
    the caller's buffers as they are (memoryviews included), never joined into a copy.
    """
    ctl = pickle.dumps(control, protocol=5)
    if len(frames) <= 2 and small_plain(frames, _INLINE):  # the common case, in one pass
        # (no _READONLY: only a read-only memoryview's frame is flagged, as below)
        lens = b"".join([_LEN.pack(len(f)) for f in frames])
        body = b"".join([lens, ctl, *frames])
        sock.sendall(_HEAD.pack(len(ctl), len(frames), len(body)) + body)
        return
    sizes = [memoryview(f).nbytes for f in frames]
    lens = b"".join(_LEN.pack(n | _READONLY if type(f) is memoryview and f.readonly else n)
                    for n, f in zip(sizes, frames))
    small = sum(sizes) < _INLINE
    inline = len(lens) + len(ctl) + (sum(sizes) if small else 0)
    head = _HEAD.pack(len(ctl), len(frames), inline)
    first = b"".join((head, lens, ctl, *frames)) if small else b"".join((head, lens, ctl))
    sock.sendall(first)
    if not small:
        for f in frames:
            sock.sendall(f)


#: Frames at least this large are read into an anonymous mmap rather than a bytearray.
_LAZY = 1 << 20


def _recv_exact(sock: socket.socket, n: int) -> Any:
    """``n`` bytes in a writable buffer: a bytearray, or for large ``n`` an anonymous mmap,
    whose pages are taken as the bytes arrive (a bytearray is zero-filled first: a sender
    announcing gigabytes would cost that memory at once, and every large read a pass)."""
    buf: Any = bytearray(n) if n < _LAZY else mmap.mmap(-1, n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("peer closed the worker channel")
        got += k
    return buf


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes as one ``bytes`` object, read straight into it (``MSG_WAITALL``)."""
    data = sock.recv(n, socket.MSG_WAITALL)
    if len(data) == n:
        return data
    parts, got = [data], len(data)
    while got < n:  # a signal, or a socket with a timeout: MSG_WAITALL gave up early
        if not parts[-1]:
            raise EOFError("peer closed the channel")
        parts.append(sock.recv(n - got, socket.MSG_WAITALL))
        got += len(parts[-1])
    return b"".join(parts)


#: A :class:`Reader` takes up to this much of what has arrived in one recv: a small
#: message's header and body (and the next messages, if they are there) in one syscall.
_AHEAD = 64 << 10


class Reader:
    """Reads messages from one socket with read-ahead (the format :func:`send_msg` writes).

    One recv takes what has arrived, up to ``_AHEAD`` bytes, so a small message costs one
    syscall instead of two. Large frames are still read straight into their own buffer;
    the bytes of one that were read ahead are copied in first. A large read-only frame
    whose first bytes were read ahead comes as a read-only ``memoryview`` of its buffer
    (not ``bytes``: that would cost a second copy of the whole frame). Every reader of
    the socket must go through the same Reader (it holds bytes the socket no longer has).
    """

    __slots__ = ("_buf", "_pos", "_scratch", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._pos = 0
        self._scratch = memoryview(bytearray(_AHEAD))

    def buffered(self) -> int:
        """Bytes read ahead and not consumed yet (a wait for the socket must not ignore
        them)."""
        return len(self._buf) - self._pos

    def _small(self, n: int) -> memoryview:
        """The next ``n`` bytes (n < _AHEAD), valid until the next read."""
        buf = self._buf
        if len(buf) - self._pos < n:
            if self._pos:
                del buf[:self._pos]
                self._pos = 0
            scratch = self._scratch
            while len(buf) < n:
                k = self.sock.recv_into(scratch, _AHEAD)
                if k == 0:
                    raise EOFError("peer closed the worker channel")
                buf += scratch[:k]
        at = self._pos
        self._pos = at + n
        return memoryview(buf)[at:at + n]

    def _large(self, n: int, readonly: bool) -> Any:
        """``n`` bytes in a buffer of their own (bytes read ahead copied in first)."""
        have = len(self._buf) - self._pos
        if not have:
            return _recv_bytes(self.sock, n) if readonly else _recv_exact(self.sock, n)
        buf: Any = bytearray(n) if n < _LAZY else mmap.mmap(-1, n)
        view = memoryview(buf)
        take = min(have, n)
        view[:take] = memoryview(self._buf)[self._pos:self._pos + take]
        self._pos += take
        got = take
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise EOFError("peer closed the worker channel")
            got += k
        return view.toreadonly() if readonly else buf

    def recv_msg(self) -> tuple[tuple[Any, ...], list[Any]]:
        """Receive one message; raises ``EOFError`` when the peer is gone."""
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        ctl_len, nframes, inline = _HEAD.unpack(self._small(_HEAD.size))
        if nframes > _MAX_FRAMES or inline < _LEN.size * nframes + ctl_len:
            raise EOFError(f"corrupt channel: {nframes} frames, {inline} inline bytes")
        body = self._small(inline) if inline < _AHEAD else \
            memoryview(self._large(inline, True))
        lens = struct.unpack_from(f"!{nframes}Q", body) if nframes else ()
        at = _LEN.size * nframes
        control = pickle.loads(body[at:at + ctl_len])
        at += ctl_len
        frames: list[Any] = []
        for n in lens:
            size = n & ~_READONLY
            readonly = n & _READONLY
            if at < inline:  # sent inline: a copy of what we read (small)
                if at + size > inline:
                    raise EOFError("corrupt channel: a frame runs past the inline bytes")
                piece = body[at:at + size]
                frames.append(bytes(piece) if readonly else bytearray(piece))
                at += size
            else:
                frames.append(self._large(size, bool(readonly)))
        del body
        return control, frames
