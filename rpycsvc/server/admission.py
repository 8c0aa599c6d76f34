"""Admitting a connection before RPyC starts: TLS, the rpycsvc hello and the authkey challenge.

:class:`_Handshake` is the rpyc authenticator of every listening server.

Connections still proving who they are hold one of ``max_pending`` slots
(:class:`_PendingSlots`); when all are taken, a newcomer displaces a silent one. A plain RPyC
client at a server with an authkey is told, in a reply it can read, why it is refused
(:func:`_refuse_plain_rpyc`).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
import zlib
from typing import Any, cast

from rpyc.utils.authenticators import AuthenticationError as RpycAuthError

from rpycsvc.protocol.handshake import MAGIC, server_handshake, server_ssl_context
from rpycsvc.server.config import ServerConfig
from rpycsvc.server.service import Runtime

log = logging.getLogger("rpycsvc.server")


class _Counters:
    """What the server counts for its metrics page beyond the pool's numbers."""

    def __init__(self) -> None:
        self.accept_errors = 0  # accept() failed (out of descriptors, memory...)
        self.handshakes_evicted = 0  # displaced by a newcomer while all slots were taken
        self.handshakes_failed = 0  # refused: wrong key, silent too long, malformed


class _Slot:
    """One connection in its handshake."""

    __slots__ = ("evicted", "fd", "heard", "host", "started")

    def __init__(self, fd: int, host: str) -> None:
        self.fd = fd
        self.host = host
        self.started = time.monotonic()
        self.heard = False  # has it sent a byte yet?
        self.evicted = False

    def mark_heard(self) -> None:
        self.heard = True


class _PendingSlots:
    """At most ``size`` connections in their handshake; when all slots are taken, a newcomer
    takes the slot of another instead of being turned away.

    The one displaced is, among the connections that have sent nothing yet (or all, if
    every one has spoken), the oldest of the host holding the most of them: a host filling
    the slots with silent sockets displaces its own, and a client with the right key still
    gets in. Each handshake is bounded by ``handshake_timeout`` anyway.
    """

    def __init__(self, size: int, counters: _Counters) -> None:
        self.size = size
        self.counters = counters
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}  # id -> slot, oldest first
        self._warned = 0.0

    def enter(self, sock: socket.socket, host: str) -> _Slot:
        slot = _Slot(sock.fileno(), host)
        with self._lock:
            if len(self._slots) >= self.size:
                victim = self._victim()
                del self._slots[id(victim)]
                victim.evicted = True
                self.counters.handshakes_evicted += 1
                # Shut its socket while holding the lock: its owner can't have closed it
                # yet (it leaves its slot first), so the descriptor is still its own.
                _shutdown_fd(victim.fd)
                self._log_eviction(victim)
            self._slots[id(slot)] = slot
        return slot

    def leave(self, slot: _Slot) -> None:
        with self._lock:
            self._slots.pop(id(slot), None)

    def _victim(self) -> _Slot:
        slots = list(self._slots.values())
        candidates = [s for s in slots if not s.heard] or slots
        per_host: dict[str, int] = {}
        for s in candidates:
            per_host[s.host] = per_host.get(s.host, 0) + 1
        worst = max(per_host, key=lambda h: per_host[h])
        return next(s for s in candidates if s.host == worst)  # oldest first

    def _log_eviction(self, victim: _Slot) -> None:
        now = time.monotonic()
        if now - self._warned >= 10.0:  # a flood would otherwise flood the log too
            self._warned = now
            log.warning("all %d handshake slots are taken: dropped a pending connection from "
                        "%s (%s for %.1f s) to make room (%d dropped so far; see "
                        "--max-pending)", self.size, victim.host,
                        "connected" if victim.heard else "silent", now - victim.started,
                        self.counters.handshakes_evicted)


class _Replay:
    """A socket with bytes already read put back in front: after peeking at a peer's first
    byte (which TLS sockets can't do with ``MSG_PEEK``), :func:`server_handshake` reads the
    whole hello as sent. Everything else goes to the socket itself."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        self._sock = sock
        self._data = data

    def recv(self, n: int) -> bytes:
        if self._data:
            out, self._data = self._data[:n], self._data[n:]
            return out
        return self._sock.recv(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def plain_client_refusal(address: str) -> str:
    """What a plain RPyC client is told when it connects to a server that needs an authkey."""
    return (f"the rpycsvc server at {address} requires an authkey, which a plain RPyC client "
            "can't present (it is proven by a challenge before RPyC starts): connect with "
            f"rpycsvc.connect({address!r}, authkey=...) or set RPYCSVC_AUTHKEY; that "
            "connection offers the same classic access (conn.modules, conn.execute, conn.eval)")


#: RPyC's frame header (``rpyc.core.channel.Channel``): body length, compressed flag.
_FRAME = struct.Struct("!LB")
#: Largest first request of a plain client we read to answer it (a real one is tiny).
_FIRST_REQUEST_MAX = 64 * 1024


def _refuse_plain_rpyc(conn: socket.socket, first: bytes, timeout: float, address: str) -> bool:
    """Answer a plain RPyC client's first request with a ``PermissionError`` reply that
    says why and what to do; True if it was answered.

    An RPyC client starts with a frame (length, compressed flag, body, ``\\n``) whose body
    is ``MSG_REQUEST`` and a brine-encoded ``(seq, request)``; ``rpyc.classic.connect``
    sends one at once (it asks for the root), ``rpyc.connect`` at its first call. The
    reply is what any RPyC server sends when a request raises, so the client raises it
    from that call, text included, instead of a bare ``EOFError``. Brine decodes plain
    values only (no code, no pickles), and the size read is bounded. Anything else gets
    no answer.
    """
    from rpyc.core import brine, consts

    def recv_exact(n: int) -> bytes:
        chunks: list[bytes] = []
        while n:
            chunk = conn.recv(min(n, 65536))
            if not chunk:
                raise EOFError("closed")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    conn.settimeout(timeout)
    try:
        length, compressed = _FRAME.unpack(first + recv_exact(_FRAME.size - len(first)))
        if length > _FIRST_REQUEST_MAX:
            return False
        body = recv_exact(length + 1)[:-1]  # (the frame ends with a newline)
        if compressed:
            inflater = zlib.decompressobj()
            body = inflater.decompress(body, _FIRST_REQUEST_MAX)
        if not body or body[0] != consts.MSG_REQUEST:
            return False
        seq = brine.load(body[1:])[0]
        if not isinstance(seq, int):
            return False
    except Exception:  # (brine raises several kinds on bytes that aren't RPyC)
        return False
    # What rpyc.core.vinegar.dump makes of an exception: (module, class), args, attributes,
    # and the text the client shows as the remote traceback. No errno/strerror attributes:
    # set to None, they'd turn the message into "[Errno None] None: None -> None".
    boxed = (("builtins", "PermissionError"), (plain_client_refusal(address),),
             (("_remote_version", "<version denied>"),),
             "(refused by the rpycsvc server before RPyC started: it requires an authkey)\n")
    reply = bytes([consts.MSG_EXCEPTION]) + brine.dump((seq, boxed))
    try:
        conn.sendall(_FRAME.pack(len(reply), 0) + reply + b"\n")
    except OSError:
        return False
    # Half-close, then read what is left, so that closing doesn't reset the connection
    # (a reset can discard the reply before the client has read it).
    try:
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + min(timeout, 2.0)
        while time.monotonic() < deadline:
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            if not conn.recv(65536):
                break
    except OSError:
        pass
    return True


def _shutdown_fd(fd: int) -> None:
    """Shut down the socket on ``fd`` (waking the thread blocked on it) without closing it."""
    try:
        borrowed = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        borrowed.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        borrowed.detach()


class _Handshake:
    """rpyc authenticator: TLS (optional), then the rpycsvc hello and authkey challenge."""

    def __init__(self, config: ServerConfig, runtime: Runtime, counters: _Counters) -> None:
        self.config = config
        self.runtime = runtime
        self.counters = counters
        self.ssl = None
        if config.ssl_certfile and config.ssl_keyfile:
            self.ssl = server_ssl_context(config.ssl_certfile, config.ssl_keyfile,
                                          config.ssl_cafile)
        self.pending = _PendingSlots(max(1, config.max_pending), counters)

    def __call__(self, sock: socket.socket) -> tuple[socket.socket, dict[str, Any]]:
        """TLS, then the hello: connections still proving who they are hold one of
        ``max_pending`` slots and have ``handshake_timeout`` seconds to finish."""
        peer = _peer(sock)
        slot = self.pending.enter(sock, peer.rsplit(":", 1)[0])
        conn = sock
        try:
            if self.ssl is not None:
                conn = self._wrap(sock, slot)
                try:
                    conn.do_handshake()
                except (OSError, ValueError) as exc:
                    raise RpycAuthError(f"TLS handshake failed: {exc}") from exc
            peer_sock = conn
            if self.config.authkey:
                peer_sock = self._rpycsvc_client_or_refuse(conn, slot)
            creds = server_handshake(peer_sock, authkey=self.config.authkey,
                                     timeout=self.config.handshake_timeout,
                                     server_info=self._info(), heard=slot.mark_heard)
        except BaseException as exc:
            # Leave the slot before the socket is closed: an evicting thread shuts sockets
            # down by descriptor number, which must still be this one's.
            self.pending.leave(slot)
            if conn is not sock:
                conn.close()  # (rpyc closes only the plain socket, which TLS took over)
            if isinstance(exc, RpycAuthError):
                self.counters.handshakes_failed += 1
                (log.debug if slot.evicted else log.warning)("refused %s: %s", peer, exc)
            raise
        self.pending.leave(slot)
        return conn, creds

    def _rpycsvc_client_or_refuse(self, conn: socket.socket, slot: _Slot) -> socket.socket:
        """On a server with an authkey: the connection, for :func:`server_handshake`, if the
        peer opens with our hello; a plain RPyC client instead gets a refusal it can read
        (see :func:`_refuse_plain_rpyc`) and ``AuthenticationError`` is raised."""
        conn.settimeout(self.config.handshake_timeout)
        try:
            first = conn.recv(1)
        except OSError as exc:
            raise RpycAuthError(f"handshake failed: {type(exc).__name__}: {exc}") from exc
        if not first:
            raise RpycAuthError("handshake failed: the client closed the connection before "
                                "saying anything")
        slot.mark_heard()
        if first == MAGIC[:1]:
            return cast(socket.socket, _Replay(conn, first))
        told = _refuse_plain_rpyc(conn, first, self.config.handshake_timeout,
                                  self.runtime.address)
        raise RpycAuthError("a plain RPyC client can't authenticate"
                            + ("; told it to use rpycsvc.connect(..., authkey=...)" if told
                               else " (and it sent no request to answer)"))

    def _wrap(self, sock: socket.socket, slot: _Slot) -> ssl.SSLSocket:
        """The TLS socket, once the client has sent its first byte; the handshake itself
        is left to the caller (``wrap_socket`` would close the socket when it fails)."""
        assert self.ssl is not None
        sock.settimeout(self.config.handshake_timeout)
        try:
            if not sock.recv(1, socket.MSG_PEEK):
                raise EOFError("client closed the connection before saying anything")
            slot.mark_heard()  # not silent any more: TLS is coming
            return self.ssl.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError, EOFError) as exc:
            raise RpycAuthError(f"TLS handshake failed: {exc}") from exc

    def _info(self) -> dict[str, Any]:
        # max_message: the client checks its arguments against it before sending them
        return {**self.runtime.info(), "max_message": self.config.max_message_size}


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"
