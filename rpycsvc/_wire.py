"""Framing between the server process and its worker processes (a local socketpair).

A message is a small pickled control tuple plus zero or more binary frames (pickled task
data, out-of-band buffers). Frames are written as they are and read with ``recv_into``
into one buffer each, so large arrays cross with no extra copies. Only the server's own
processes speak this; clients never see it.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

_HEAD = struct.Struct("!II")  # control length, number of frames
_LEN = struct.Struct("!Q")
_MAX_FRAMES = 1 << 16


def send_msg(sock: socket.socket, control: tuple[Any, ...], frames: tuple[Any, ...] = ()) -> None:
    """Send one message. Callers serialise concurrent senders with their own lock."""
    ctl = pickle.dumps(control, protocol=5)
    sizes = [memoryview(f).nbytes for f in frames]
    head = _HEAD.pack(len(ctl), len(frames)) + b"".join(_LEN.pack(n) for n in sizes)
    if sum(sizes) < 65536:
        sock.sendall(b"".join((head, ctl, *frames)))
        return
    sock.sendall(head + ctl)
    for f in frames:
        sock.sendall(f)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("peer closed the worker channel")
        got += k
    return buf


def recv_msg(sock: socket.socket) -> tuple[tuple[Any, ...], list[bytearray]]:
    """Receive one message; raises ``EOFError`` when the peer is gone."""
    ctl_len, nframes = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    if nframes > _MAX_FRAMES:
        raise EOFError(f"corrupt worker channel: {nframes} frames")
    lens = struct.unpack(f"!{nframes}Q", _recv_exact(sock, _LEN.size * nframes)) if nframes else ()
    control = pickle.loads(_recv_exact(sock, ctl_len))
    frames = [_recv_exact(sock, n) for n in lens]
    return control, frames
