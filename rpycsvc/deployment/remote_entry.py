"""A started remote entry point and what carries its bytes: a process's pipes or an SSH channel.

The process is ``ssh`` (or a local interpreter, for ``plumbum.local``); the channel is
paramiko's, from plumbum's ``ParamikoMachine``.

:func:`rpycsvc.deployment.bootstrap.launch` starts one; the caller then speaks to the entry
over it (``sendall``/``recv``, or an RPyC ``stream()``) and ends it with ``close()``.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import threading
import time
from typing import IO, Any

_STDERR_KEEP = 64 * 1024


class RemoteEntry:
    """A started remote entry point, over whatever carries its bytes (see the subclasses).

    ``remote_pid``, ``python_version`` and ``python_executable`` come from the ready line.
    ``close()`` (or leaving ``with``) ends the remote side by EOF, then ends the carrier.
    Subclasses provide the byte primitives: ``fileno``/``recv`` (the entry's output; the fd
    is readable when bytes or EOF wait), ``sendall``, ``_recv_stderr``, ``_close_input``,
    ``_wait``, ``kill``, ``exit_status``, ``_release`` and ``stream`` (an RPyC stream).
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self.remote_pid, self.python_version, self.python_executable = 0, "", ""
        self._stderr = bytearray()
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._collect, daemon=True)

    # -- primitives ---------------------------------------------------------------------------
    def fileno(self) -> int:
        raise NotImplementedError

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes the entry wrote (b"" at EOF); blocks until some arrive."""
        raise NotImplementedError

    def sendall(self, data: bytes) -> None:
        raise NotImplementedError

    def _recv_stderr(self, n: int) -> bytes:
        raise NotImplementedError

    def _close_input(self) -> None:
        raise NotImplementedError

    def _wait(self, timeout: float) -> bool:
        """True once the carrier ended within ``timeout`` seconds."""
        raise NotImplementedError

    def kill(self) -> None:
        """End the carrier now (the remote side then reads EOF)."""
        raise NotImplementedError

    def exit_status(self) -> int | None:
        """The remote command's exit status once known (255: ssh failed), else None."""
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def stream(self) -> Any:
        """An RPyC stream over the channel, for after the ready line."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def _collect(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            while chunk := self._recv_stderr(65536):
                with self._lock:
                    self._stderr += chunk
                    del self._stderr[:-_STDERR_KEEP]

    def stderr_text(self) -> str:
        """What the remote side (and ssh) wrote to stderr so far: the last 64 KiB."""
        with self._lock:
            return self._stderr.decode("utf-8", "replace")

    def close(self, timeout: float = 5.0) -> int | None:
        """Send EOF, let the remote entry exit (bounded), then end the carrier. Returns the
        exit status."""
        if self._closed:
            return self.exit_status()
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError, EOFError):
            self._close_input()
        # Keep reading meanwhile: a carrier blocked on a full pipe or window would never end.
        with selectors.DefaultSelector() as sel, contextlib.suppress(OSError, ValueError):
            sel.register(self.fileno(), selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0 and sel.select(left):
                if not self.recv(65536):
                    break
        self.reap(max(0.0, deadline - time.monotonic()))
        return self.exit_status()

    def reap(self, timeout: float) -> None:
        """Let the carrier end within ``timeout`` seconds (else end it), then release it:
        the end of :meth:`close`, and of a start that failed (``bootstrap.launch``)."""
        if not self._wait(timeout):
            with contextlib.suppress(OSError):
                self.kill()
            self._wait(5.0)
        self._reader.join(2.0)
        self._closed = True
        self._release()

    def __enter__(self) -> RemoteEntry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteProcess(RemoteEntry):
    """An entry point run by a local process whose pipes carry it: ``ssh`` (a host string or
    plumbum's ``SshMachine``) or the server itself (``plumbum.local``). ``stdin``/``stdout``
    are the binary (buffered) channel; ``pid`` is the local process.
    """

    def __init__(self, proc: subprocess.Popen[bytes], host: str) -> None:
        super().__init__(host)
        assert proc.stdin and proc.stdout and proc.stderr
        self.proc, self.pid = proc, proc.pid
        self.stdin: IO[bytes] = proc.stdin
        self.stdout: IO[bytes] = proc.stdout
        self._stderr_pipe: IO[bytes] = proc.stderr
        self._reader.start()

    def fileno(self) -> int:
        return self.stdout.fileno()

    def recv(self, n: int) -> bytes:
        return os.read(self.stdout.fileno(), n)

    def sendall(self, data: bytes) -> None:
        self.stdin.write(data)
        self.stdin.flush()

    def _recv_stderr(self, n: int) -> bytes:
        return os.read(self._stderr_pipe.fileno(), n)

    def _close_input(self) -> None:
        self.stdin.close()

    def _wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        self.proc.kill()

    def exit_status(self) -> int | None:
        return self.proc.poll()

    def _release(self) -> None:
        for pipe in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                pipe.close()

    def stream(self) -> Any:
        # linear-time writes, and `last_activity` for the client's liveness check
        from rpycsvc.protocol.pipes import FastPipeStream

        return FastPipeStream(self.stdout, self.stdin)


class RemoteChannel(RemoteEntry):
    """An entry point over one SSH channel of a connection we don't own (paramiko's
    ``Channel``, from plumbum's ``ParamikoMachine``). The channel is socket-like: its
    ``fileno()`` is readable when data or EOF wait, and RPyC's own ``SocketStream`` runs over
    it (as RPyC's zero-deploy does). ``owner`` is kept alive with it: plumbum's popen object,
    whose file objects would shut the channel's input when collected. Ending the channel
    (``kill``) never closes the connection: that belongs to the machine.
    """

    pid = None

    def __init__(self, channel: Any, host: str, owner: object = None) -> None:
        super().__init__(host)
        self.channel, self._owner = channel, owner
        self._reader.start()

    def fileno(self) -> int:
        return int(self.channel.fileno())

    def recv(self, n: int) -> bytes:
        return bytes(self.channel.recv(n))

    def sendall(self, data: bytes) -> None:
        if self.channel.closed:
            raise OSError("the ssh channel is closed")
        self.channel.sendall(data)

    def _recv_stderr(self, n: int) -> bytes:
        return bytes(self.channel.recv_stderr(n))

    def _close_input(self) -> None:
        self.channel.shutdown_write()

    def _wait(self, timeout: float) -> bool:
        # the exit status arrives before the channel closes; a closed channel sends none
        deadline = time.monotonic() + timeout
        while not self.channel.exit_status_ready() and not self.channel.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.channel.status_event.wait(min(left, 0.1))
        return True

    def kill(self) -> None:
        self.channel.close()

    def exit_status(self) -> int | None:
        if self.channel.exit_status_ready():
            return int(self.channel.recv_exit_status())
        return 255 if self.channel.closed else None

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            self.channel.close()

    def stream(self) -> Any:
        # linear-time writes, and `last_activity` for the client's liveness check
        from rpycsvc.protocol.pipes import ChannelStream

        return ChannelStream(self.channel)
