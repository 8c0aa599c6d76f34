"""Classic-mode output, per connection: ``with rpycsvc.redirected_stdout(conn): ...``.

RPyC's own ``redirected_stdio`` swaps the server's process-wide ``sys.stdout``, so every
client's prints follow the last one who asked (and hang when it leaves). An rpycsvc server
instead routes each write by the connection whose request is running: only *this*
connection's ``execute``/``eval``/module calls print to *our* stream, and everything is put
back when the block ends, even on an exception. RPyC's tutorial idiom
``conn.modules.sys.stdout = sys.stdout`` keeps working (process-wide, as in RPyC), and the
server restores its own stream when that client disconnects.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rpycsvc.protocol.rpyc_connection import CURRENT


class ConnectionStreams(io.TextIOBase):
    """A server's ``sys.stdout``/``sys.stderr``: writes go to the stream the current
    connection registered, else to the original one."""

    def __init__(self, fallback: Any, name: str) -> None:
        self.fallback = fallback
        self.name = name
        self.targets: dict[int, Any] = {}
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def _target(self) -> Any:
        conn = getattr(CURRENT, "conn", None)
        if conn is not None:
            target = self.targets.get(id(conn))
            if target is not None:
                return target
        return self.fallback

    def write(self, text: str) -> int:
        target = self._target()
        try:
            target.write(text)
        except Exception:
            if target is self.fallback:
                raise
            self.fallback.write(text)  # the client went away mid-write
        return len(text)

    def flush(self) -> None:
        try:
            self._target().flush()
        except Exception:
            pass

    def set(self, conn: Any, stream: Any) -> None:
        with self._lock:
            if stream is None:
                self.targets.pop(id(conn), None)
            else:
                self.targets[id(conn)] = stream

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.fallback, "encoding", "utf-8")

    def fileno(self) -> int:
        return int(self.fallback.fileno())

    def isatty(self) -> bool:
        return False


#: The routers this process installed, (stdout, stderr), once installed.
INSTALLED: tuple[ConnectionStreams, ConnectionStreams] | None = None


def install() -> tuple[ConnectionStreams, ConnectionStreams]:
    """Route this process's stdout/stderr per connection (idempotent)."""
    global INSTALLED
    if INSTALLED is None:
        INSTALLED = (ConnectionStreams(sys.stdout, "stdout"),
                     ConnectionStreams(sys.stderr, "stderr"))
    for name, router in zip(("stdout", "stderr"), INSTALLED):
        if getattr(sys, name) is not router and not _is_netref(getattr(sys, name)):
            setattr(sys, name, router)
    return INSTALLED


def _is_netref(obj: Any) -> bool:
    from rpyc.core.netref import BaseNetref

    return isinstance(obj, BaseNetref)


@contextmanager
def _redirected(conn: Any, fd: int, stream: Any) -> Iterator[None]:
    raw = getattr(conn, "conn", conn)  # an rpycsvc.Client, or a raw rpyc connection
    local = stream if stream is not None else (sys.stdout if fd == 1 else sys.stderr)
    raw.root.redirect_output(fd, local)
    try:
        yield
    finally:
        try:
            raw.root.redirect_output(fd, None)
        except Exception:
            pass  # the connection is gone; the server dropped the redirect with it


def redirected_stdout(conn: Any, stream: Any = None) -> Any:
    """For the ``with`` block, this connection's remote prints go to ``stream``
    (default: our ``sys.stdout``); other clients' output is untouched."""
    return _redirected(conn, 1, stream)


def redirected_stderr(conn: Any, stream: Any = None) -> Any:
    """Like :func:`redirected_stdout`, for stderr."""
    return _redirected(conn, 2, stream)
