"""Framing between the server process and its worker processes (a local socketpair).

A message is a small pickled control tuple plus zero or more binary frames (pickled task
data, out-of-band buffers). A fixed header says how many bytes follow it *inline* (the
frame lengths, the control tuple and, when they are small, the frames), so a small message
takes two reads: the header, then the rest. Large frames follow on their own, written
from the sender's buffers and read into one buffer each, so large arrays cross with no
extra copies. The same framing carries a client's direct *lane* to a worker (see
:mod:`rpycsvc.lane`); there the control tuple is unpickled with a caller-given loader, so
a restricted server can refuse globals.
A message may carry file descriptors (``SCM_RIGHTS``): that is how the server hands a
lane's socket to a worker.
"""

from __future__ import annotations

import array
import mmap
import pickle
import socket
import struct
from typing import Any, Callable

_HEAD = struct.Struct("!IIQ")  # control length, number of frames, inline bytes after the head
#: Frames are sent inline (in the same write as the header) while their total is below this.
_INLINE = 65536
_LEN = struct.Struct("!Q")
_MAX_FRAMES = 1 << 16
#: Set in a frame's length: its source was read-only (``bytes``), so the receiver may
#: read it into an immutable ``bytes`` (one copy, no zero-filling) instead of a bytearray.
_READONLY = 1 << 63


#: Most file descriptors one message may carry.
MAX_FDS = 4


def send_msg(sock: socket.socket, control: tuple[Any, ...], frames: tuple[Any, ...] = (),
             fds: tuple[int, ...] = ()) -> None:
    """Send one message (with ``fds`` attached, over a Unix socket).

    Callers serialise concurrent senders with their own lock. Large frames are sent from
    the caller's buffers as they are (memoryviews included), never joined into a copy.
    """
    ctl = pickle.dumps(control, protocol=5)
    sizes = [memoryview(f).nbytes for f in frames]
    lens = b"".join(_LEN.pack(n | _READONLY if type(f) is memoryview and f.readonly else n)
                    for n, f in zip(sizes, frames))
    small = sum(sizes) < _INLINE
    inline = len(lens) + len(ctl) + (sum(sizes) if small else 0)
    head = _HEAD.pack(len(ctl), len(frames), inline)
    first = b"".join((head, lens, ctl, *frames)) if small else b"".join((head, lens, ctl))
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        sent = sock.sendmsg([first], anc)
        if sent < len(first):
            sock.sendall(memoryview(first)[sent:])
    else:
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


def _recv_head(sock: socket.socket, fds: list[int]) -> bytearray:
    """The fixed-size header, collecting any file descriptors sent along with it."""
    buf = bytearray(_HEAD.size)
    got = 0
    cmsg_space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    while got < _HEAD.size:
        k, anc, _flags, _addr = sock.recvmsg_into([memoryview(buf)[got:]], cmsg_space)
        if k == 0:
            raise EOFError("peer closed the channel")
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[: len(data) - len(data) % a.itemsize])
                fds.extend(a)
        got += k
    return buf


def recv_msg(
    sock: socket.socket, *, fds: list[int] | None = None,
    loads: Callable[[Any], Any] = pickle.loads, max_bytes: int = 0,
) -> tuple[tuple[Any, ...], list[Any]]:
    """Receive one message; raises ``EOFError`` when the peer is gone.

    Frames are bytearrays, or ``bytes`` where the sender's buffer was read-only.

    With ``fds`` (a list), file descriptors sent along are appended to it. ``loads``
    unpickles the control tuple. ``max_bytes`` (if set) bounds what one message may
    announce; a bigger one raises ``ValueError`` before anything is allocated.
    """
    head = _recv_head(sock, fds) if fds is not None else _recv_exact(sock, _HEAD.size)
    ctl_len, nframes, inline = _HEAD.unpack(head)
    if nframes > _MAX_FRAMES or inline < _LEN.size * nframes + ctl_len:
        raise EOFError(f"corrupt channel: {nframes} frames, {inline} inline bytes")
    if max_bytes and inline > max_bytes:
        raise ValueError(f"a message of {inline} bytes is over the limit of {max_bytes} bytes")
    body = _recv_exact(sock, inline)
    view = memoryview(body)
    lens = struct.unpack_from(f"!{nframes}Q", body) if nframes else ()
    sizes = [n & ~_READONLY for n in lens]
    if max_bytes and inline + sum(sizes) > max_bytes:
        raise ValueError(f"a message of {inline + sum(sizes)} bytes is over the limit of "
                         f"{max_bytes} bytes")
    at = _LEN.size * nframes
    control = loads(view[at:at + ctl_len])
    at += ctl_len
    frames: list[Any] = []
    for n, size in zip(lens, sizes):
        readonly = n & _READONLY
        if at < inline:  # sent inline: a slice of what we read (small)
            if at + size > inline:
                raise EOFError("corrupt channel: a frame runs past the inline bytes")
            piece = view[at:at + size]
            frames.append(bytes(piece) if readonly else bytearray(piece))
            at += size
        else:
            frames.append(_recv_bytes(sock, size) if readonly else _recv_exact(sock, size))
    return control, frames
