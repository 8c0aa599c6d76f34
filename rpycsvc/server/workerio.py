"""Where a task's prints go, inside a worker process.

``sys.stdout``/``sys.stderr`` of a worker are :class:`_Router` objects that give each write to
the task that made it (by thread); a process worker's file descriptors 1 and 2 are pipes
read by :class:`_FdPump` objects (output of C code and child processes); logging records go
through :class:`_LogForwarder`. Each running task has a :class:`_TaskContext` holding its
pending output; the :class:`~rpycsvc.server.worker.Worker` buffers and sends it (what this
module needs of it is :class:`_Worker`).

A task may close or replace descriptors 0-2; :func:`restore_std_fds` puts them back after
each task. Otherwise the next descriptor opened in the worker (a file a later task opens, a
socket it connects) would take the lowest free number, 1, and low-level output would be
written into it.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from collections import deque
from typing import Any, Protocol

from rpycsvc.protocol.module_finder import Fetch

#: A running task's output is sent at least this often (seconds)...
FLUSH_INTERVAL = 0.05
#: ...or as soon as this much whole-line output is buffered.
FLUSH_BYTES = 32 * 1024


class _TaskContext:
    """What a running task's output is attributed to, and its pending output."""

    __slots__ = ("chunks", "client", "fetch", "fetch_lock", "fetching", "forward", "lock",
                 "logging", "sizes", "task_id")

    def __init__(self, task_id: int, forward: bool, logging: bool = False) -> None:
        self.task_id = task_id
        #: asks the task's client for a module (rpycsvc.protocol.forwarding); None: nobody to ask
        self.fetch: Fetch | None = None
        #: the token of the task's client (its ``fwd`` option; "" if it forwards nothing)
        self.client = ""
        #: held while one of the task's imports asks its client; ``fetching`` goes False
        #: when the task returns (see TaskImports.end): a thread the task started
        #: gets nothing from the client after that
        self.fetch_lock = threading.Lock()
        self.fetching = True
        self.forward = forward
        self.logging = logging
        self.lock = threading.Lock()
        # Pending text per fd, as pieces (appending to one str would be quadratic). Writers
        # append without a lock (deque.append is atomic); flushers take ``lock`` and pop from
        # the left, so a write racing a flush is never lost. ``sizes`` is approximate.
        self.chunks: dict[int, deque[str]] = {1: deque(), 2: deque()}
        self.sizes = {1: 0, 2: 0}


class _Worker(Protocol):
    """What the routers, pumps and log handler here need of the worker that sends the
    output (:class:`rpycsvc.server.worker.Worker`), which imports this module."""

    #: ``local.ctx``: the task running on this thread, if any
    local: threading.local
    #: the task on the main thread (process role): fd-level output belongs to it
    inline: _TaskContext | None

    def current(self) -> _TaskContext | None: ...

    def write(self, fd: int, text: str, ctx: _TaskContext | None) -> bool: ...

    def flush_locked(self, ctx: _TaskContext, fd: int, whole_lines: bool) -> None: ...

    def emit_log(self, record_dict: dict[str, Any], ctx: _TaskContext) -> None: ...


class _Router(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a worker: routes each write to the task that made it."""

    def __init__(self, worker: _Worker, fd: int, fallback: io.TextIOBase) -> None:
        self._worker = worker
        self._local = worker.local
        self._fd = fd
        self._fallback = fallback

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if type(text) is not str and not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:  # not a task's: the server's log
            self._fallback.write(text)
        elif ctx.forward:  # Worker.write, inlined: print() calls this twice per line
            fd = self._fd
            ctx.chunks[fd].append(text)
            ctx.sizes[fd] += len(text)
            if ctx.sizes[fd] >= FLUSH_BYTES:
                with ctx.lock:
                    self._worker.flush_locked(ctx, fd, whole_lines=True)
        return len(text)

    def flush(self) -> None:
        self._fallback.flush()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd


class _FdPump:
    """Reads what is written to fd 1 or 2 (child processes, C code) and attributes it.

    Output read here belongs to the task running on the main thread, if any; otherwise it
    goes to the server's log. Reads happen under a lock, so :meth:`drain` can take
    whatever is still in the pipe when a task ends and attribute it to that task.
    """

    def __init__(self, worker: _Worker, fd: int, log: io.TextIOBase) -> None:
        self.worker, self.fd, self.log = worker, fd, log
        self.lock = threading.Lock()
        r, w = os.pipe()
        os.dup2(w, fd)
        # Keep the write end (not inheritable): to put ``fd`` back if a task closes it, and so
        # the pipe never reads as ended (that would end our reader thread for good).
        self.w = w
        st = os.fstat(w)
        self._pipe_id = (st.st_dev, st.st_ino)  # (restore() compares fd with it: one fstat)
        # non-blocking: drain() may empty the pipe between our select() and our read()
        os.set_blocking(r, False)
        self.r = r
        threading.Thread(target=self._run, name=f"rpycsvc-fd{fd}", daemon=True).start()

    def _pending(self) -> int:
        import fcntl
        import termios

        buf = bytearray(4)
        fcntl.ioctl(self.r, termios.FIONREAD, buf)
        return int.from_bytes(buf, sys.byteorder)

    def _read_once(self) -> bool:
        """Read what is there; False at EOF. Never blocks (the fd is non-blocking)."""
        try:
            chunk = os.read(self.r, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        text = chunk.decode(errors="replace")
        if not self.worker.write(self.fd, text, self.worker.inline):
            self.log.write(text)
            self.log.flush()
        return True

    def _run(self) -> None:
        import select

        while True:
            select.select([self.r], [], [])
            with self.lock:
                if not self._read_once():
                    return

    def drain(self) -> None:
        with self.lock:
            for _ in range(64):  # bounded: at most 4 MiB per task end
                if self._pending() <= 0 or not self._read_once():
                    return

    def restore(self) -> None:
        """Point ``fd`` at our pipe again if a task closed or replaced it."""
        try:
            st = os.fstat(self.fd)
            same = (st.st_dev, st.st_ino) == self._pipe_id
        except OSError:  # (closed)
            same = False
        if not same:
            os.dup2(self.w, self.fd)


def restore_std_fds(pumps: list[_FdPump]) -> None:
    """After a task: descriptors 0-2 are occupied again (0 by /dev/null if it was closed,
    1 and 2 by their pumps' pipes), so nothing the worker opens or receives later lands
    there (see the module docstring)."""
    try:
        os.fstat(0)
    except OSError:
        null = os.open(os.devnull, os.O_RDONLY)
        if null != 0:
            os.dup2(null, 0)
            os.close(null)
    for pump in pumps:
        pump.restore()


class _LogForwarder(logging.Handler):
    """Root handler in a worker: sends a task's records to its client when asked to,
    otherwise prints warnings and worse to stderr like Python's last-resort handler."""

    def __init__(self, worker: _Worker) -> None:
        super().__init__(logging.DEBUG)
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        ctx = self.worker.current()
        if ctx is not None and ctx.logging and ctx.forward:
            try:
                msg = record.getMessage()
                exc_text = (logging.Formatter().formatException(record.exc_info)
                            if record.exc_info else record.exc_text)
            except Exception:
                self.handleError(record)
                return
            keep = ("name", "levelno", "levelname", "pathname", "filename", "module", "lineno",
                    "funcName", "created", "msecs", "threadName", "processName", "process")
            data = {k: getattr(record, k, None) for k in keep}
            data.update(msg=msg, args=None, exc_text=exc_text)
            self.worker.emit_log(data, ctx)
        elif record.levelno >= logging.WARNING:
            sys.stderr.write(self.format(record) + "\n")
