"""Receiving a task message: its frames read off the channel's stream into buffers of their
own, within the message limit and the inbound budget, and handed to the connection's task
handler (the format is :mod:`rpycsvc.protocol.taskframes`; the frames around it,
:mod:`rpycsvc.protocol.channel`)."""

from __future__ import annotations

from typing import Any, Protocol

from rpycsvc.protocol import buffers, taskframes
from rpycsvc.protocol.budget import InboundBudget, Reservation
from rpycsvc.protocol.limits import too_large_message
from rpycsvc.protocol.socket_stream import CHUNK


class TaskChannel(Protocol):
    """What reading a task message needs of the channel it arrives on
    (:class:`~rpycsvc.protocol.channel.FastChannel`): its stream, limit, budget and task
    handler, and its bounded reads."""

    stream: Any
    budget: InboundBudget | None
    max_message: int
    trusted: bool
    task_handler: taskframes.TaskHandler | None

    def refuse(self, kind: str, text: str) -> EOFError: ...

    def take(self, res: Reservation, n: int) -> None: ...

    def read_holding(self, read: Any, n: int, res: Reservation) -> Any: ...

    def read_idle_bounded(self, read: Any, n: int) -> Any: ...


def recv_task(channel: TaskChannel, length: int) -> None:
    """Read one task message (see :mod:`rpycsvc.protocol.taskframes`) and hand it to the
    channel's ``task_handler``. Over ``max_message`` in all, its frames are read and dropped a
    piece at a time (nothing kept) and the handler is told why: that task fails alone,
    the connection stays."""
    handler = channel.task_handler
    if handler is None or not channel.trusted:
        raise channel.refuse("task", "a task message from a peer that has not said the "
                             "rpycsvc hello (only rpycsvc clients send them); closing")
    if length > taskframes.MAX_INLINE:
        raise channel.refuse("size", f"a task message announced {length} inline bytes "
                             f"(at most {taskframes.MAX_INLINE}); closing")
    # (no stall bound for the inline part: it holds no budget, and it is small)
    inline = getattr(channel.stream, "read_buffer", channel.stream.read)(length)  # ≤ 1 MiB
    small = getattr(handler, "on_small_task", None)
    forward = False
    try:
        control, lens, at = taskframes.parse_head(inline)
        if small is not None and control is not None and control[0] == "run" \
                and (at < len(inline) or not lens):
            size = sum([n & ~taskframes.READONLY for n in lens])
            if at + size != len(inline):
                raise ValueError("a corrupt task message: its frames don't fill its "
                                 "inline bytes")
            forward = True
            frames: list[Any] = []
        else:
            frames = taskframes.inline_frames(inline, lens, at)
    except Exception as exc:  # ValueError, UnpicklingError, and what garbage raises
        raise channel.refuse("corrupt", f"a corrupt task message ({type(exc).__name__}: "
                             f"{exc}); closing") from None
    if forward and small is not None:
        small(control, inline, size)  # forwarded as it came: its frames unread here
        return
    del inline
    if frames or not lens:
        _hand_over(channel, handler, control, frames)
        return
    sizes = [n & ~taskframes.READONLY for n in lens]
    total = length + sum(sizes)
    if total > channel.max_message:
        read = getattr(channel.stream, "read_buffer", channel.stream.read)
        if control is None:  # the control part is the first frame: read it for the key
            control = ("?",)
            if sizes[0] <= taskframes.MAX_CONTROL_FRAME:
                first = bytes(channel.read_idle_bounded(channel.stream.read, sizes[0]))
                control = _load_control(channel, first)
                sizes = sizes[1:]
        for size in sizes:
            while size:
                n = min(size, CHUNK)
                channel.read_idle_bounded(read, n)
                size -= n
        handler.on_task_refused(control, too_large_message(
            "data", total, channel.max_message))
        return
    budget = channel.budget
    res = budget.start() if budget is not None else None
    try:
        for flagged, size in zip(lens, sizes):
            # a large bytes frame is read straight into a bytes object: no copy when it is
            # unpickled (see rpycsvc.protocol.buffers)
            filled = buffers.new_bytes(size) if flagged & taskframes.READONLY \
                and size >= taskframes.LAZY else None
            buf, view = filled if filled is not None else (taskframes.new_buffer(size), None)
            if view is None:
                view = memoryview(buf)
            at = 0
            while at < size:
                n = min(size - at, taskframes.PIECE)
                if res is not None:
                    channel.take(res, n)
                piece = view[at:at + n]
                if res is not None:
                    channel.read_holding(lambda _n, p=piece: _fill(channel.stream, p), n, res)
                else:
                    channel.read_idle_bounded(lambda _n, p=piece: _fill(channel.stream, p), n)
                at += n
            if filled is not None:
                view.release()
                frames.append(memoryview(buf))  # read-only, as bytes frames always are
            else:
                frames.append(view.toreadonly() if flagged & taskframes.READONLY else buf)
            del view, filled
    finally:
        if budget is not None and res is not None:
            budget.finish(res)
    _hand_over(channel, handler, control, frames)


def _hand_over(channel: TaskChannel, handler: Any, control: tuple[Any, ...] | None,
               frames: list[Any]) -> None:
    if control is None:  # sent as the first frame (a large control part)
        control = _load_control(channel, frames.pop(0))
    handler.on_task(control, frames)


def _load_control(channel: TaskChannel, data: Any) -> tuple[Any, ...]:
    try:
        return taskframes.load_control(data)
    except Exception as exc:
        raise channel.refuse("corrupt", f"a corrupt task message ({type(exc).__name__}: "
                             f"{exc}); closing") from None


def _fill(stream: Any, view: memoryview) -> None:
    """Fill ``view`` from the stream: in place where the stream can, else by copy."""
    read_into = getattr(stream, "read_into", None)
    if read_into is not None:
        read_into(view)
    else:
        view[:] = stream.read(len(view))
