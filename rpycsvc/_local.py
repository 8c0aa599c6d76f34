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
        import selectors

        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        line = b""
        try:
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise ConnectError(f"local server did not start within {timeout:g} s")
                chunk = os.read(self.proc.stdout.fileno(), 256)
                if not chunk:
                    raise ConnectError(f"local server exited with code {self.proc.wait(5)}; "
                                       "see its messages on stderr")
                line += chunk
        finally:
            sel.close()
        return line.decode().strip()

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
