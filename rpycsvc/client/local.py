"""``Cluster.local``'s servers: ``rpycsvc serve --port 0`` child processes on this machine.

A server's stdout is a pipe: we need its first line (the address). After that the pipe is
read to the end by a thread, because a server whose stdout nobody reads blocks in its next
large ``print`` (a classic ``execute("print(...)")`` of 64 kB stalls the whole connection).
What it prints goes to our *stderr*, each line prefixed with the server's address: next to
its log lines (its stderr is ours), and not mixed into our stdout, which belongs to our
program (and its tasks' output, streamed there on purpose). It is dropped for
``output="discard"``. A remote server's prints stay on that server, as in RPyC.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import weakref

from rpycsvc.client.output import write_above
from rpycsvc.errors import ConnectError

#: Serialises forwarded lines of every local server, so lines never interleave.
_WRITE_LOCK = threading.Lock()

#: Every running local server of this process, for :func:`_release_in_fork_child`.
_LIVE: weakref.WeakSet[_LocalServer] = weakref.WeakSet()


def _release_in_fork_child() -> None:
    """In a child forked from us (``os.fork``, multiprocessing's ``fork`` start method), let
    go of every local server's stdin write end.

    A server stops at EOF on its stdin (``--exit-on-stdin-eof``), i.e. once every holder of
    the write end is gone. A forked child inherits our copy: without this, a client killed
    by SIGKILL would leave its servers running for as long as any child it forked lives.
    The descriptor is pointed at ``/dev/null`` (``dup2``) rather than closed, so the child's
    copy of the file object, which still names that number, can never close or write a
    descriptor the child reuses for something else; and no lock is taken (the parent's
    threads are gone in the child and may have held one).
    """
    for server in list(_LIVE):
        stdin = server.proc.stdin
        if stdin is None:
            continue
        try:
            fd = stdin.fileno()
        except (OSError, ValueError):
            continue  # already closed by stop()
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, fd, inheritable=False)
            finally:
                os.close(null)
        except OSError:
            pass


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_release_in_fork_child)


class _LocalServer:
    """An ``rpycsvc serve --port 0`` child process for :meth:`Cluster.local`."""

    def __init__(self, workers: int, args: list[str], *, forward: bool = True) -> None:
        cmd = [sys.executable, "-m", "rpycsvc.cli", "serve", "--port", "0", "-q",
               "--workers", str(workers), "--exit-on-stdin-eof", *args]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        # A session of its own: a Ctrl-C in the terminal or a Jupyter kernel interrupt (SIGINT
        # to our whole process group) interrupts our code, not the servers, which we stop in
        # close(). Our end of the stdin pipe is held until then: when this process ends,
        # however (even SIGKILL), the pipe closes and the server stops (--exit-on-stdin-eof).
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                                     env=env, start_new_session=True)
        self.forward = forward
        self._pump: threading.Thread | None = None
        _LIVE.add(self)

    def wait_address(self, timeout: float) -> str:
        """The server's address; from then on its stdout is drained by a thread."""
        address = read_address(self.proc, timeout)
        self._pump = threading.Thread(target=self._drain, args=(f"[{address}] ",), daemon=True,
                                      name=f"rpycsvc-local-stdout-{address}")
        self._pump.start()
        return address

    def _drain(self, prefix: str) -> None:
        """Read the server's stdout to its end; forward whole lines to our stderr."""
        assert self.proc.stdout is not None
        partial = b""
        try:
            while True:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    break
                if not self.forward:
                    continue
                *lines, partial = (partial + chunk).split(b"\n")
                if lines:
                    _emit(prefix, lines)
            if partial and self.forward:
                _emit(prefix, [partial])
        except OSError:
            pass
        finally:
            self.proc.stdout.close()  # the pipe is ours to close once drained

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> None:
        _LIVE.discard(self)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._pump is not None:  # it closes the pipe at EOF, which follows the exit
            self._pump.join(5)
        elif self.proc.stdout is not None:
            self.proc.stdout.close()


def _emit(prefix: str, lines: list[bytes]) -> None:
    text = "".join(prefix + ln.decode("utf-8", "replace") + "\n" for ln in lines)
    with _WRITE_LOCK:
        try:
            write_above(sys.stderr, text)  # above a live progress bar, if one is shown
        except (OSError, ValueError, AttributeError):
            pass  # our stderr is closed or gone: nothing sensible to do


def read_address(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The ``host:port`` line ``rpycsvc serve`` prints first, waiting at most ``timeout`` s."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    line = b""
    try:
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise ConnectError(f"the server did not print its address within {timeout:g} s")
            chunk = os.read(proc.stdout.fileno(), 1)  # byte by byte: leave the rest unread
            if not chunk:
                raise ConnectError(f"the server exited with code {proc.wait(5)} before "
                                   "listening; see its messages on stderr")
            line += chunk
    finally:
        sel.close()
    return line.decode().strip()
