"""The ``ssh HOST cat`` reference: what an open SSH session moves, to compare SSH deployment with.

A 1-byte echo through one open ``cat`` session (:class:`SshEcho`), and bytes through
``cat > /dev/null`` and out of ``head -c N /dev/zero``, timed inside the open session, so the
session's setup is not counted.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import threading
import time
from typing import Any

from rpycsvc.cli.bench.report import BenchError


class SshPipe:
    """``ssh ALIAS COMMAND`` with unbuffered pipes and deadline-bounded reads."""

    def __init__(self, argv: list[str], command: str) -> None:
        self.proc = subprocess.Popen([*argv, command], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.win, self.rout = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.rout, selectors.EVENT_READ)

    def read_exact(self, n: int, deadline: float) -> int:
        """Read ``n`` bytes (counted, not kept beyond one buffer); returns the last byte."""
        got, last = 0, -1
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise BenchError(f"ssh session: {got} of {n} bytes before the deadline")
            chunk = os.read(self.rout, min(n - got, 1 << 20))
            if not chunk:
                raise BenchError(f"ssh session ended after {got} of {n} bytes: {self.stderr()}")
            got += len(chunk)
            last = chunk[-1]
        return last

    def write_all(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self.win, view):]

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace").strip()[-500:]

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._sel.close()


def ssh_cat_up(argv: list[str], data: Any, timeout: float) -> float:
    """Seconds for ``data`` through ``ssh HOST 'cat > /dev/null'``, timed inside the session
    (from the session's ready byte to its done byte, sent after ``cat`` saw our EOF)."""
    p = SshPipe(argv, "printf R; cat > /dev/null; printf D")
    ok = False
    try:
        deadline = time.monotonic() + timeout
        if p.read_exact(1, deadline) != ord("R"):
            raise BenchError("ssh cat: no ready byte")
        errors: list[BaseException] = []

        def feed() -> None:
            try:
                p.write_all(data)
                assert p.proc.stdin is not None
                p.proc.stdin.close()
            except BaseException as exc:
                errors.append(exc)

        t0 = time.perf_counter()
        writer = threading.Thread(target=feed, daemon=True, name="rpycsvc-bench-ssh-feed")
        writer.start()
        done = p.read_exact(1, deadline)
        dt = time.perf_counter() - t0
        writer.join(10)
        if errors or done != ord("D"):
            raise BenchError(f"ssh cat upload failed: {errors[:1] or 'no done byte'}")
        ok = True
        return dt
    finally:
        if not ok and p.proc.poll() is None:
            p.proc.kill()  # unblocks a writer stuck on a full pipe
        p.close()


def ssh_cat_down(argv: list[str], nbytes: int, timeout: float) -> float:
    """Seconds for ``nbytes`` out of ``ssh HOST 'head -c N /dev/zero'``, timed inside the open
    session (from our go-ahead line to the last byte)."""
    p = SshPipe(argv, f"printf R; read x; head -c {int(nbytes)} /dev/zero")
    ok = False
    try:
        deadline = time.monotonic() + timeout
        if p.read_exact(1, deadline) != ord("R"):
            raise BenchError("ssh head: no ready byte")
        t0 = time.perf_counter()
        p.write_all(b"\n")
        if p.read_exact(nbytes, deadline) != 0:
            raise BenchError("ssh head: the last byte was not a zero")
        ok = True
        return time.perf_counter() - t0
    finally:
        if not ok and p.proc.poll() is None:
            p.proc.kill()
        p.close()


class SshEcho:
    """One open ``ssh HOST cat`` session; :meth:`ping` is a 1-byte round trip through it."""

    def __init__(self, argv: list[str], timeout: float) -> None:
        self.pipe = SshPipe(argv, "cat")
        self.timeout = timeout

    def ping(self, _i: int = 0) -> float:
        t0 = time.perf_counter()
        self.pipe.write_all(b"x")
        got = self.pipe.read_exact(1, time.monotonic() + self.timeout)
        dt = time.perf_counter() - t0
        if got != ord("x"):
            raise BenchError("ssh cat echoed the wrong byte")
        return dt

    def close(self) -> None:
        self.pipe.close()
