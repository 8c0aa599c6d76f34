"""A server as a child process under resource limits, for attack tests.

An attack that works (a memory bomb, descriptor exhaustion) must fail the test, not eat the
machine: the server runs under ``RLIMIT_AS`` and/or ``RLIMIT_NOFILE``, so a regression shows
up as a ``MemoryError`` in its log, a dead server, or a refused client. Its log goes to a
file the test reads; its memory is read with psutil.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from rpycsvc import ConnectError
from rpycsvc.client.local import read_address

REPO = Path(__file__).resolve().parents[2]


class LimitedServer:
    """``rpycsvc serve --port 0 ARGS`` with ``address_space``/``nofile`` limits (bytes,
    descriptors) applied in the child before it starts. ``logfile`` gets its log (INFO)."""

    def __init__(self, *args: str, logfile: Path, address_space: int | None = None,
                 nofile: int | None = None, timeout: float = 60.0) -> None:
        self.logfile = logfile
        cmd = [sys.executable, "-m", "rpycsvc.cli", "serve", "--port", "0",
               "--logfile", str(logfile), *args]
        # One malloc arena: glibc reserves 64 MiB of address space per arena (per thread),
        # which would count against RLIMIT_AS without being memory anyone uses.
        env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_ARENA_MAX": "1"}

        def limit() -> None:
            if address_space is not None:
                resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self._stderr = open(str(logfile) + ".stderr", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL, env=env, cwd=str(REPO),
                                     preexec_fn=limit)
        try:
            self.address = read_address(self.proc, timeout)
        except ConnectError as exc:
            self.stop()
            raise RuntimeError(f"{exc}: {self.log()}") from exc
        self.port = int(self.address.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        """Resident memory of the server process itself (not its workers), in bytes."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def log(self) -> str:
        """Everything the server logged and wrote to stderr so far."""
        text = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
        err = Path(str(self.logfile) + ".stderr")
        return text + (err.read_text(errors="replace") if err.exists() else "")

    def wait_log(self, needle: str, timeout: float = 30.0) -> str:
        """The log once it contains ``needle``; AssertionError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if needle in text:
                return text
            if time.monotonic() > deadline or not self.alive():
                raise AssertionError(f"{needle!r} not in the server's log:\n{text[-4000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> LimitedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A port that was free a moment ago (for --metrics-port, which can't report its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(port: int, name: str) -> float:
    """One unlabelled sample from ``http://127.0.0.1:port/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} on the metrics page")


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes ``sock`` (EOF or reset) within ``timeout`` s; anything it
    sends meanwhile is read and dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            return False
        except OSError:
            return True
