"""Structural proofs of concurrency and ordering, without sleeps or timed asserts.

Tasks running on a server connect back to a coordinator in the test process over
127.0.0.1 TCP:

* :class:`Barrier` lets its ``parties`` tasks go only once all of them are connected at
  the same time; a task that is never joined by the others fails after a bounded wait.
  So "every task returned" proves that they ran at once.
* :class:`Gate` holds each arriving task until the test releases it, so the test decides
  the order in which tasks finish and can observe the order in which they started.

The task-side functions (:func:`meet`, :func:`pass_gate`) are importable by path
(``"tests.support.rendezvous:meet"``), so plain RPyC clients can run them too.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import threading
import time
from types import TracebackType

#: Upper bound for any single wait in these helpers (seconds).
WAIT = 30.0


def _listener(backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


class Barrier:
    """Accept ``parties`` connections within ``timeout``; then send ``go`` to all of them.

    If fewer arrive in time, every connection is closed and the waiting tasks fail.
    ``met`` is set once all parties were released together.
    """

    def __init__(self, parties: int, timeout: float = WAIT) -> None:
        self.parties = parties
        self.timeout = timeout
        self.met = threading.Event()
        self._sock = _listener(parties + 4)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="test-barrier", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conns: list[socket.socket] = []
        deadline = time.monotonic() + self.timeout
        try:
            while len(conns) < self.parties:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._sock.settimeout(left)
                try:
                    conn, _ = self._sock.accept()
                except (socket.timeout, OSError):
                    return
                conns.append(conn)
            for conn in conns:
                conn.sendall(b"g")
            self.met.set()
        finally:
            for conn in conns:
                conn.close()
            self._sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # shutdown wakes a blocked accept(); close doesn't
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(self.timeout + 5)

    def __enter__(self) -> Barrier:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def meet(port: int, timeout: float = WAIT, spin: bool = False) -> int:
    """Task side of :class:`Barrier`: wait to be released; return this process's pid.

    With ``spin``, burn CPU while waiting (a CPU-bound task that still has to meet the
    others). Raises ``TimeoutError`` or ``ConnectionError`` if the others never came.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the other tasks never reached the barrier")
            ready, _, _ = select.select([sock], [], [], 0 if spin else left)
            if ready:
                break
            sum(i * i for i in range(20_000))  # only with spin: CPU work between polls
        if sock.recv(1) != b"g":
            raise ConnectionError("the barrier gave up: the other tasks never arrived")
    return os.getpid()


class Gate:
    """Tasks arrive with a label and wait; the test releases them one by one.

    ``arrival(timeout)`` returns the next ``(label, connection)`` in arrival order;
    ``release(connection)`` lets that task go and waits until it has left the gate.
    """

    def __init__(self, timeout: float = WAIT) -> None:
        self.timeout = timeout
        self.arrivals: queue.Queue[tuple[str, socket.socket]] = queue.Queue()
        self._sock = _listener(64)
        self.port: int = self._sock.getsockname()[1]
        self._open: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="test-gate", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.settimeout(self.timeout)
            self._open.append(conn)
            try:
                label = b""
                while not label.endswith(b"\n"):
                    chunk = conn.recv(256)
                    if not chunk:
                        break
                    label += chunk
            except OSError:
                continue
            self.arrivals.put((label.decode().strip(), conn))

    def arrival(self, timeout: float | None = None) -> tuple[str, socket.socket]:
        """The next task to arrive: ``(label, connection)``; raises ``queue.Empty``."""
        return self.arrivals.get(timeout=self.timeout if timeout is None else timeout)

    def release(self, conn: socket.socket) -> None:
        """Let the task go, and wait (bounded) until it has closed its end."""
        conn.sendall(b"g")
        conn.settimeout(self.timeout)
        while conn.recv(64):
            pass
        conn.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):  # shutdown wakes a blocked accept(); close doesn't
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in self._open:
            conn.close()
        self._thread.join(5)

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def pass_gate(port: int, label: str, timeout: float = WAIT) -> str:
    """Task side of :class:`Gate`: announce ``label``, wait to be released, return it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(label.encode() + b"\n")
        if sock.recv(1) != b"g":
            raise ConnectionError(f"gate closed before task {label!r} was released")
    return label
