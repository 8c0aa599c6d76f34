"""Real rpycsvc servers for tests: in-process (fast) or as a subprocess (killable).

Both bind 127.0.0.1 on port 0; readiness is a bounded wait for the listening address,
never a sleep; both are torn down in ``finally`` by the fixtures that use them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rpycsvc import ConnectError, Server, ServerConfig
from rpycsvc.client.local import read_address

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def running_server(**options: object) -> Iterator[Server]:
    """An in-process server with ``ServerConfig(port=0, **options)``."""
    cfg = ServerConfig(port=0, **{"workers": 2, **options})  # type: ignore[arg-type]
    srv = Server(cfg)
    try:
        srv.start()
        yield srv
    finally:
        srv.close(grace=0)


class ServerProcess:
    """``rpycsvc serve --port 0 ...`` as a child process; ``address`` from its first line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 30.0):
        cmd = [sys.executable, "-m", "rpycsvc.cli", "serve", "--port", "0", "-q", *args]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=full_env, cwd=str(REPO))
        self.address = self._read_address(timeout)
        self.port = int(self.address.rsplit(":", 1)[1])

    def _read_address(self, timeout: float) -> str:
        try:
            return read_address(self.proc, timeout)
        except ConnectError as exc:
            if self.proc.poll() is not None and self.proc.stderr is not None:
                raise RuntimeError(f"{exc}: {self.proc.stderr.read().decode()}") from exc
            raise TimeoutError(str(exc)) from exc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """kill -9, for failure tests."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, bounded wait, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
