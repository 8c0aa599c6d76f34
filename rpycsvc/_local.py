"""``Cluster.local``'s servers: ``rpycsvc serve --port 0`` child processes on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from .errors import ConnectError


class _LocalServer:
    """An ``rpycsvc serve --port 0`` child process for :meth:`Cluster.local`."""

    def __init__(self, workers: int, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "rpycsvc.cli", "serve", "--port", "0", "-q",
               "--workers", str(workers), *args]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     env=env)

    def wait_address(self, timeout: float) -> str:
        return read_address(self.proc, timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


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
