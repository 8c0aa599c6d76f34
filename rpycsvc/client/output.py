"""Where remote stdout/stderr goes on the client: streamed with a prefix, captured, or dropped.

The worker sends whole lines only, and each batch is written here with one ``write`` under
a lock, so lines of concurrent tasks never interleave inside a line.

Live lines (a progress bar being redrawn on the terminal) register here. Streamed output is
then written *above* them, as ``tqdm.write`` does: each live line is cleared, the output is
written on lines of its own, and the live lines are drawn again below it. Everything that
writes to the terminal does so under :data:`terminal_lock`, so a bar's redraw never lands in
the middle of a remote line.

In a Jupyter kernel, output is sent to the cell that submitted the task (see
:func:`current_cell`): the client's reader thread would otherwise write it into whichever
cell ipykernel thinks of as current (the one running now, or the one that connected).
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, Protocol, TextIO

from rpycsvc.errors import ConfigError

MODES = ("stream", "capture", "discard")

#: Held by whoever writes to the terminal: routers, live lines. Reentrant, so a live line's
#: ``clear``/``redraw`` may take it again.
terminal_lock = threading.RLock()


class LiveLine(Protocol):
    """A line redrawn in place (a progress bar). Both methods run with the lock held."""

    def clear(self) -> None:
        """Erase the line from the terminal and leave the cursor at its start."""

    def redraw(self) -> None:
        """Draw the line again where the cursor is."""


_live_lines: list[LiveLine] = []


def show_live_line(line: LiveLine) -> None:
    """``line`` is on the terminal now: output written through :func:`write_above` goes
    above it until :func:`hide_live_line`."""
    with terminal_lock:
        _live_lines.append(line)


def hide_live_line(line: LiveLine) -> None:
    with terminal_lock:
        if line in _live_lines:
            _live_lines.remove(line)


@contextmanager
def above_live_lines() -> Iterator[None]:
    """Whatever is written to the terminal inside this block lands above the live lines:
    they are cleared on entry and drawn again on exit, all under :data:`terminal_lock`."""
    with terminal_lock:
        lines = list(_live_lines)
        for line in lines:
            line.clear()
        try:
            yield
        finally:
            for line in lines:
                line.redraw()


def write_above(stream: TextIO, text: str, cell: Any = None) -> None:
    """Write ``text`` (whole lines) to ``stream`` above any live line, then redraw those.

    For local code that prints while a ``map(progress=True)`` bar is shown, like
    ``tqdm.write``. ``cell`` (from :func:`current_cell`) is the notebook cell the text
    belongs to. Errors writing (a closed stdout) are ignored: output is best effort.
    """
    with above_live_lines(), in_cell(stream, cell):
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass  # our own stdout is closed; nothing sensible to do


# -- Jupyter: which cell a task's output belongs to ---------------------------------------------
def current_cell() -> dict[str, Any] | None:
    """The notebook cell running in this thread now, or None outside a Jupyter kernel.

    It is ipykernel's *parent header* of ``sys.stdout`` (the header of the cell's
    ``execute_request``), which decides the cell a ``stream`` message lands in. A task's
    future takes it when the task is submitted, so the task's prints go to the cell that
    ran it even when they come later, while another cell runs.
    """
    if "ipykernel" not in sys.modules:  # (every task asks: nothing to look at outside)
        return None
    try:
        header = getattr(sys.stdout, "parent_header", None)
    except Exception:  # an odd stdout (a netref of a closed connection): no cell then
        return None
    return header if isinstance(header, dict) and header.get("msg_id") else None


@contextmanager
def in_cell(stream: Any, cell: dict[str, Any] | None) -> Iterator[None]:
    """What this thread writes to ``stream`` (an ipykernel ``OutStream``) inside the block
    goes to ``cell``'s output. Nothing changes for other streams, other threads, or
    ``cell=None``.

    ipykernel keeps the parent header per thread in a ``ContextVar`` that takes priority
    over its global (current cell) and per-thread (the cell that started a thread) ones;
    7.x sets it with ``set_thread_parent``, 6.x has the variable only. ``write`` files the
    text under the header it reads then, so setting it around the write is enough.
    """
    if cell is None:
        yield
        return
    setter = getattr(stream, "set_thread_parent", None)
    if callable(setter):
        token = setter(cell)
        try:
            yield
        finally:
            stream.reset_thread_parent(token)
        return
    var = getattr(stream, "_parent_header", None)
    if not isinstance(var, contextvars.ContextVar):
        yield
        return
    token = var.set(cell)
    try:
        yield
    finally:
        var.reset(token)


class OutputRouter:
    """Routes one client's remote output. ``prefix`` may use ``{address}`` and ``{task}``."""

    def __init__(self, mode: str = "stream", prefix: str = "[{address}] ",
                 forward_logging: bool = False) -> None:
        if mode not in MODES:
            raise ConfigError(f"output must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode = mode
        self.prefix = prefix
        self.forward_logging = forward_logging
        self._lock = threading.Lock()

    def log(self, address: str, key: int, payload: bytes) -> None:
        """Hand a task's logging record to the local logger of the same name.

        The record gets ``server`` (the address) and ``task`` attributes, so handlers and
        formatters can show where it came from (``%(server)s``).
        """
        import logging
        import pickle

        data = pickle.loads(payload)
        data.update(server=address, task=key)
        logger = logging.getLogger(data.get("name") or "root")
        if logger.isEnabledFor(int(data.get("levelno") or 0)):
            with above_live_lines():  # a handler writing to the terminal keeps the bar below
                logger.handle(logging.makeLogRecord(data))

    def emit(self, address: str, key: int, fd: int, text: str, mode: str, sink: Any) -> None:
        """Deliver ``text`` (whole lines, except at a task's end) from task ``key``."""
        if mode == "discard" or not text:
            return
        if mode == "capture":
            if sink is not None:
                with self._lock:
                    sink.add_output(fd, text)
            return
        head = self.prefix.format(address=address, task=key)
        lines = text.splitlines(keepends=True)
        block = "".join(head + (ln if ln.endswith("\n") else ln + "\n") for ln in lines)
        # (the future of the task is the sink; it knows the notebook cell that submitted it)
        write_above(sys.stdout if fd == 1 else sys.stderr, block,
                    getattr(sink, "_cell", None))


# -- a command's own stdout, read by a pipe that may close early -------------------------------
#: Exit status of a command whose stdout reader went away (``rpycsvc status | head``):
#: 128 + SIGPIPE, what the shell shows for a program that SIGPIPE ended, so ``set -o
#: pipefail`` scripts see it as they would for ``cat`` or ``yes``.
EXIT_STDOUT_CLOSED = 141


def write_stdout(text: str) -> None:
    """Write and flush a command's own output. If the reader went away (``| head`` has
    read enough), end the command quietly with :data:`EXIT_STDOUT_CLOSED` instead of a
    ``BrokenPipeError`` traceback. Raises ``SystemExit``, so ``finally`` blocks and
    context managers (local servers, connections) still clean up."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed()


@contextmanager
def ending_quietly_if_stdout_closes() -> Iterator[None]:
    """Run a command's body; if it fails with ``BrokenPipeError`` *because stdout's reader
    went away*, end quietly as :func:`write_stdout` does. A broken pipe of anything else
    (a socket to a server) propagates as it is. Flushes stdout on the way out, so the
    interpreter's own last flush has nothing left to fail on."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        if _stdout_reader_gone():
            stdout_closed()
        raise


def _stdout_reader_gone() -> bool:
    # The write end of a pipe (or a socket) whose reader closed polls as POLLERR/POLLHUP.
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def stdout_closed() -> NoReturn:
    """Stop writing to a stdout nobody reads: point its descriptor at ``/dev/null`` (so the
    interpreter's last flush at exit can't complain either, as the ``signal`` module's
    docs advise) and exit with :data:`EXIT_STDOUT_CLOSED`."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass  # no real descriptor (a test's StringIO): nothing would flush to a pipe
    raise SystemExit(EXIT_STDOUT_CLOSED)
