"""The raw socket reference: the same echo and transfers over a bare TCP or ssl socket, both ends.

The workloads compare rpycsvc with what a bare socket does on the same servers: the far end is
:func:`serve_raw` (:func:`serve_raw_ssl` for TLS), run by a thread-mode task on a server, or a
local subprocess when the server has no thread mode; :class:`RawPeer` (:class:`SslPeer`) is
this end. They speak one-byte opcodes (:func:`_raw_loop`) and check every byte with CRC-32s.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import sys
import time
import uuid
import zlib
from typing import Any

from rpycsvc.cli.bench.report import BenchError
from rpycsvc.cli.bench.tasks import random_bytes
from rpycsvc.server.wire import _recv_exact

_LEN = struct.Struct("!Q")
#: Seconds any single socket operation of the raw reference may block.
RAW_TIMEOUT = 60.0


# (thread-mode tasks of a server share one worker process, hence this module's globals).
_LISTENERS: dict[str, socket.socket] = {}


def open_listener(host: str) -> tuple[str, int]:
    sock = socket.create_server((host, 0))
    sock.settimeout(RAW_TIMEOUT)
    token = uuid.uuid4().hex
    _LISTENERS[token] = sock
    return token, sock.getsockname()[1]


def serve_raw(token: str) -> dict[str, int]:
    sock = _LISTENERS.pop(token)
    try:
        conn, _ = sock.accept()
    finally:
        sock.close()
    with conn:
        return _raw_loop(conn)


def _raw_loop(conn: socket.socket) -> dict[str, int]:
    """One-byte opcodes: P echo, U upload, C crc of the upload, G make a blob, D send it, Q quit."""
    conn.settimeout(RAW_TIMEOUT)
    if conn.family in (socket.AF_INET, socket.AF_INET6):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    counts = {"pings": 0, "bytes_in": 0, "bytes_out": 0}
    last: Any = b""
    blob = b""
    while True:
        op = conn.recv(1)
        if op in (b"", b"Q"):
            return counts
        if op == b"P":
            conn.sendall(b"P")
            counts["pings"] += 1
        elif op == b"U":
            (n,) = _LEN.unpack(_recv_exact(conn, _LEN.size))
            last = _recv_exact(conn, n)
            conn.sendall(b"A")
            counts["bytes_in"] += n
        elif op == b"C":
            conn.sendall(_LEN.pack(zlib.crc32(last)))
        elif op == b"G":
            n, seed = struct.unpack("!QQ", _recv_exact(conn, 16))
            blob = random_bytes(n, seed)
            conn.sendall(_LEN.pack(zlib.crc32(blob)))
        elif op == b"D":
            conn.sendall(blob)
            counts["bytes_out"] += len(blob)
        else:
            raise ValueError(f"raw reference: unknown opcode {op!r}")


def _raw_main() -> None:
    """The raw reference as a subprocess on 127.0.0.1 (when a server has no thread mode)."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(RAW_TIMEOUT)
    print(sock.getsockname()[1], flush=True)
    conn, _ = sock.accept()
    sock.close()
    with conn:
        print(json.dumps(_raw_loop(conn)), flush=True)



# -- the raw TCP reference, client side -----------------------------------------------------------

class RawPeer:
    """A plain TCP connection to the raw reference server (see :func:`_raw_loop`)."""

    def __init__(self, client: Any, timeout: float = 30.0) -> None:
        self.sock, self.where, self._fut, self._proc = self._connect(client, timeout)
        self.sock.settimeout(RAW_TIMEOUT)
        self.pings = 0

    def _connect(self, client: Any, timeout: float) -> tuple[
            socket.socket, str, Any, subprocess.Popen[bytes] | None]:
        """Start the far end and connect to it: (the socket, where the far end runs, the
        thread-mode task serving it or None, the local subprocess serving it or None)."""
        from rpycsvc.client.connect import parse_address

        host, _ = parse_address(client.address)
        fut: Any = None
        proc: subprocess.Popen[bytes] | None = None
        if client.threads > 0:
            opts = client.options(mode="thread")
            token, port = opts.submit(open_listener, host).result(timeout)
            fut = opts.submit(serve_raw, token)
            where = f"a thread-mode task on {client.address} (its thread worker process)"
        else:
            host = "127.0.0.1"
            proc = subprocess.Popen(
                [sys.executable, "-c", "import rpycsvc.cli.bench.raw_socket as b; b._raw_main()"],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            port = int(_readline(proc, timeout))
            where = "a subprocess on 127.0.0.1 (the server has no thread mode)"
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, where, fut, proc

    def ping(self) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(b"P")
        if self.sock.recv(1) != b"P":
            raise BenchError("raw TCP echo returned the wrong byte")
        dt = time.perf_counter() - t0
        self.pings += 1
        return dt

    def upload(self, data: Any, crc: int) -> float:
        view = memoryview(data).cast("B")
        t0 = time.perf_counter()
        self.sock.sendall(b"U" + _LEN.pack(view.nbytes))
        self.sock.sendall(view)
        if _recv_exact(self.sock, 1) != b"A":
            raise BenchError("raw upload: bad acknowledgement")
        dt = time.perf_counter() - t0
        self.sock.sendall(b"C")
        (got,) = _LEN.unpack(_recv_exact(self.sock, _LEN.size))
        if got != crc:
            raise BenchError(f"raw upload: CRC-32 {got:#x} on the far side, {crc:#x} here")
        return dt

    def download(self, nbytes: int, seed: int) -> float:
        self.sock.sendall(b"G" + struct.pack("!QQ", nbytes, seed))
        (crc,) = _LEN.unpack(_recv_exact(self.sock, _LEN.size))
        t0 = time.perf_counter()
        self.sock.sendall(b"D")
        data = _recv_exact(self.sock, nbytes)
        dt = time.perf_counter() - t0
        if zlib.crc32(data) != crc:
            raise BenchError("raw download: CRC-32 mismatch")
        return dt

    def close(self, timeout: float = 30.0) -> dict[str, int]:
        """Stop the far side; returns its counts (pings echoed, bytes in and out)."""
        try:
            self.sock.sendall(b"Q")
        finally:
            self.sock.close()
        if self._fut is not None:
            counts: dict[str, int] = self._fut.result(timeout)
            return counts
        assert self._proc is not None
        try:
            line = _readline(self._proc, timeout)
            return dict(json.loads(line))
        finally:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            if self._proc.stdout is not None:
                self._proc.stdout.close()


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise BenchError(f"raw reference subprocess said nothing within {timeout:g} s")
        return proc.stdout.readline().decode().strip()
    finally:
        sel.close()


# -- the raw ssl reference: tasks on the TLS server's thread worker -------------------------------

_SSL_LISTENERS: dict[str, tuple[socket.socket, ssl.SSLContext]] = {}


def open_ssl_listener(host: str, certfile: str, keyfile: str) -> tuple[str, int]:
    """A TLS listener in this (thread worker) process; served by :func:`serve_raw_ssl`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    sock = socket.create_server((host, 0))
    sock.settimeout(RAW_TIMEOUT)
    token = uuid.uuid4().hex
    _SSL_LISTENERS[token] = (sock, ctx)
    return token, sock.getsockname()[1]


def serve_raw_ssl(token: str) -> dict[str, int]:
    sock, ctx = _SSL_LISTENERS.pop(token)
    try:
        conn, _ = sock.accept()
    finally:
        sock.close()
    conn.settimeout(RAW_TIMEOUT)
    with ctx.wrap_socket(conn, server_side=True) as tls:
        return _raw_loop(tls)


class SslPeer(RawPeer):
    """The raw reference protocol over a raw Python ``ssl`` socket to a thread-mode task."""

    def __init__(self, client: Any, ctx: ssl.SSLContext, certfile: str, keyfile: str,
                 timeout: float = 30.0) -> None:
        self._tls = (ctx, certfile, keyfile)
        super().__init__(client, timeout)

    def _connect(self, client: Any, timeout: float) -> tuple[
            socket.socket, str, Any, subprocess.Popen[bytes] | None]:
        ctx, certfile, keyfile = self._tls
        opts = client.options(mode="thread")
        token, port = opts.submit(open_ssl_listener, "127.0.0.1", certfile, keyfile).result(
            timeout)
        fut = opts.submit(serve_raw_ssl, token)
        plain = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = ctx.wrap_socket(plain, server_hostname="127.0.0.1")
        return sock, f"a thread-mode task on {client.address}", fut, None
