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
through RPyC's own send queue and lock, so task and RPyC messages never interleave (see
:mod:`rpycsvc.protocol.sending`).

Control tuples hold only builtin scalars and containers: a peer's control tuple is
unpickled with a loader that resolves no globals at all.
"""

from __future__ import annotations

import io
import mmap
import pickle
import struct
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

    @property
    def nbytes(self) -> int:
        """Bytes left to write."""
        return len(self.head) + sum(v.nbytes for v in self.large)

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
    (:func:`~rpycsvc.protocol.sending.send_framed`)."""
    if sum(memoryview(f).nbytes for f in frames) >= INLINE:
        return None
    msg = TaskMessage(control, frames, relayed=True)
    return None if msg.large else msg.head


def new_buffer(size: int) -> Any:
    """A writable buffer of ``size`` bytes: an anonymous mmap when large (its pages are
    taken as the bytes arrive; a bytearray is zero-filled, all of it, first)."""
    return bytearray(size) if size < LAZY else mmap.mmap(-1, size)
