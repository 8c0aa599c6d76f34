"""Listening, authentication and lifecycle of an rpycsvc server.

:class:`Server` binds (127.0.0.1 by default), starts the worker pool, accepts connections
in a thread each, runs TLS and the rpycsvc handshake before RPyC, and on ``close()`` stops
accepting, lets running tasks finish within a grace period and stops the workers.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import zlib
from types import FrameType
from typing import Any, cast

from rpyc.utils.authenticators import AuthenticationError as RpycAuthError
from rpyc.utils.helpers import classpartial
from rpyc.utils.server import ForkingServer, OneShotServer, ThreadedServer

from rpycsvc.errors import ConfigError
from rpycsvc.protocol import taskframes
from rpycsvc.protocol.budget import InboundBudget
from rpycsvc.protocol.channel import FastChannel
from rpycsvc.protocol.handshake import MAGIC, server_handshake, server_ssl_context
from rpycsvc.protocol.limits import PREAUTH_MAX_MESSAGE
from rpycsvc.protocol.rpyc_connection import PROTOCOL_CONFIG
from rpycsvc.protocol.socket_stream import FastSocketStream
from rpycsvc.server.config import ServerConfig
from rpycsvc.server.hosted import load_services
from rpycsvc.server.pool import WorkerPool
from rpycsvc.server.service import ClassicComputeService, ComputeService, Runtime

log = logging.getLogger("rpycsvc.server")
#: How long a closing server waits for results still being written to their clients.
DRAIN_TIMEOUT = 5.0

#: serve() wakes at least this often (seconds) so signal handlers run promptly.
_WAKE = 0.2


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


class _ServerMixin:
    """Our connection setup for RPyC's server classes: fast stream, no compression, and
    bounded frames (see :class:`~rpycsvc.protocol.channel.FastChannel`)."""

    runtime: Runtime
    rpycsvc_config: ServerConfig
    inbound: InboundBudget

    def _serve_client(self, sock: socket.socket, credentials: Any) -> None:
        peer = _peer(sock)
        creds = credentials or {}
        log.info("connection from %s (%s client)", peer,
                 "rpycsvc" if creds.get("client") else "plain rpyc")
        config = dict(self.protocol_config, credentials=creds,  # type: ignore[attr-defined]
                      endpoints=(sock.getsockname(), sock.getpeername()),
                      logger=self.logger)  # type: ignore[attr-defined]
        stream = FastSocketStream(sock, prefix=creds.get("prefix", b""))
        # An rpycsvc hello (after the authkey challenge, if any) is trusted with full-size
        # messages; a plain RPyC peer gets them after its first well-formed request, which
        # it must finish within the handshake timeout.
        max_message = self.rpycsvc_config.max_message_size
        trusted = bool(creds.get("client"))
        channel = FastChannel(
            stream, limit=max_message if trusted else PREAUTH_MAX_MESSAGE,
            max_message=max_message, budget=self.inbound,
            stall_timeout=self.rpycsvc_config.stall_timeout,
            deadline=None if trusted else
            time.monotonic() + self.rpycsvc_config.handshake_timeout)
        conn = self.service._connect(channel, config)  # type: ignore[attr-defined]
        try:
            self._handle_connection(conn)  # type: ignore[attr-defined]
        except (EOFError, OSError):
            pass  # the client went away, or a limit dropped it (FastChannel logs that)
        except Exception as exc:  # malformed frames, a different protocol: drop this client only
            log.warning("dropping %s after a protocol error: %s: %s (a different rpyc "
                        "version, or not an RPyC client?)", peer, type(exc).__name__, exc)
            conn.close()
        finally:
            log.info("connection from %s closed", peer)


class _Threaded(_ServerMixin, ThreadedServer):
    pass


class _Forking(_ServerMixin, ForkingServer):
    pass


class _OneShot(_ServerMixin, OneShotServer):
    pass


_SERVERS = {"threaded": _Threaded, "forking": _Forking, "oneshot": _OneShot}

class Server:
    """An rpycsvc server. ``start()`` returns once it listens; ``serve()`` blocks.

    >>> with Server(ServerConfig(port=0)) as srv:   # doctest: +SKIP
    ...     print(srv.address)
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.config.validate()
        self.pool = WorkerPool(
            self.config.effective_workers, threads=self.config.threads,
            endpoints=self.config.endpoints, memory_limit=self.config.memory_limit,
        )
        self.runtime = Runtime(self.pool, classic=self.config.classic,
                               hosted=load_services(self.config.services,
                                                    self.config.service_scope))
        self._rpyc: Any = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._stop = threading.Event()  # asked to stop: serve() returns, close() follows
        #: accept errors, evicted and failed handshakes (for the metrics page)
        self.counters = _Counters()
        #: inbound bytes being received at once, all connections together
        self.inbound = InboundBudget(self.config.inbound_budget)

    @property
    def address(self) -> str:
        """``host:port`` as clients should dial it (``[v6]:port`` for IPv6)."""
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def host(self) -> str:
        """The address bound, as the system reports it (``localhost`` → ``127.0.0.1``)."""
        return str(self._rpyc.host) if self._rpyc is not None else self.config.host

    @property
    def port(self) -> int:
        return int(self._rpyc.port) if self._rpyc is not None else self.config.port

    def start(self) -> Server:
        """Start the workers and listen. Raises :class:`ConfigError` if it can't."""
        cfg = self.config
        if cfg.mode == "stdio":
            raise ConfigError("stdio mode has no listener; use serve_stdio()")
        if cfg.mode != "forking":  # forked children start their own pool lazily
            self.pool.start()
        service_cls = ClassicComputeService if cfg.classic else ComputeService
        server_cls = _SERVERS[cfg.mode]
        try:
            self._rpyc = server_cls(
                classpartial(service_cls, self.runtime),
                hostname=cfg.host, port=cfg.port, ipv6=cfg.ipv6,
                authenticator=_Handshake(cfg, self.runtime, self.counters),
                protocol_config=dict(PROTOCOL_CONFIG), logger=logging.getLogger("rpycsvc.rpyc"),
                auto_register=cfg.register, registrar=_registrar(cfg),
            )
        except OSError as exc:
            self.pool.close(grace=0)
            raise ConfigError(
                f"can't listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from exc
        self._rpyc.runtime = self.runtime
        self._rpyc.rpycsvc_config = cfg
        self._rpyc.inbound = self.inbound
        if not cfg.lanes:
            log.warning("--no-lanes (lanes=False) is deprecated and ignored: every task takes "
                        "the one task path now; drop the option")
        self._rpyc._listen()  # with port 0, the real port is known from here on
        self.runtime.address = self.address
        self._rpyc._register()
        self._thread = threading.Thread(target=self._accept_loop, name="rpycsvc-accept",
                                        daemon=True)
        self._thread.start()
        log.info("listening on %s with %d workers", self.address, self.pool.size)
        return self

    def _accept_loop(self) -> None:
        """Accept connections until closed. Unlike RPyC's ``accept()`` (which turns every
        error into ``EOFError``, so one ``EMFILE`` ended the loop and left the server deaf),
        a failed ``accept()`` is logged, counted, and retried after a growing pause."""
        listener = self._rpyc.listener
        backoff = 0.0
        try:
            while self._rpyc.active and not self._closed.is_set():
                try:
                    sock, _addr = listener.accept()
                except socket.timeout:
                    continue
                except OSError as exc:
                    if not self._rpyc.active or self._closed.is_set() \
                            or exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                        return  # the listener was closed
                    if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ECONNABORTED):
                        continue
                    backoff = min(1.0, backoff * 2 or 0.05)
                    self._accept_failed(exc, backoff)
                    self._stop.wait(backoff)
                    continue
                backoff = 0.0
                self._serve_accepted(sock)
        except Exception:
            if not self._closed.is_set():
                log.exception("accept loop failed")
        finally:
            if self.config.mode == "oneshot":
                self._stop.set()

    def _accept_failed(self, exc: OSError, backoff: float) -> None:
        self.counters.accept_errors += 1
        now = time.monotonic()
        if now - getattr(self, "_accept_warned", 0.0) >= 10.0:  # a warning per 10 s at most
            self._accept_warned = now
            hint = " (out of file descriptors: raise 'ulimit -n', or fewer connections)" \
                if exc.errno in (errno.EMFILE, errno.ENFILE) else ""
            log.warning("accepting a connection failed: %s%s; retrying in %.2f s "
                        "(%d accept errors so far)", exc.strerror or exc, hint, backoff,
                        self.counters.accept_errors)

    def _serve_accepted(self, sock: socket.socket) -> None:
        """What RPyC's ``accept()`` does with a new socket: track it, serve it (a thread,
        a child process, or here for oneshot)."""
        rpyc_server = self._rpyc
        sock.setblocking(True)
        rpyc_server.clients.add(sock)
        try:
            rpyc_server._accept_method(sock)
        except Exception as exc:  # e.g. no thread could be started: drop this one only
            rpyc_server.clients.discard(sock)
            sock.close()
            self.counters.accept_errors += 1
            log.warning("could not serve a new connection: %s: %s", type(exc).__name__, exc)

    def serve(self, timeout: float | None = None) -> bool:
        """Block until asked to stop (:meth:`close`, a signal handler from
        :meth:`install_signal_handlers`, or the end of a oneshot connection); True if so.
        Call :meth:`close` afterwards, from the main thread."""
        # Wake up now and then: the kernel may deliver SIGTERM to another thread (in
        # forking mode it did, while SIGCHLD was pending), which only flags the main
        # thread; our Python handler then runs the next time the main thread wakes.
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.wait(_WAKE if deadline is None
                                  else max(0.0, min(_WAKE, deadline - time.monotonic()))):
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    def request_stop(self) -> None:
        """Make :meth:`serve` return (as SIGTERM does), from any thread; the caller of
        :meth:`serve` then runs :meth:`close`."""
        self._stop.set()

    def close(self, grace: float | None = None) -> None:
        """Stop accepting, let running tasks finish within ``grace`` seconds, stop workers."""
        self._stop.set()
        if self._rpyc is None or getattr(self, "_closing", False):
            self._closed.set()
            return
        self._closing = True
        self._rpyc.active = False
        try:
            self._rpyc.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._rpyc.listener.close()
        self.pool.close(self.config.grace if grace is None else grace)
        # results handed over meanwhile still reach their clients (bounded: a client that
        # doesn't read can't hold the shutdown up for long)
        taskframes.drain(DRAIN_TIMEOUT)
        self._rpyc.close()
        self._closed.set()
        log.info("server %s stopped", self.address)

    def __enter__(self) -> Server:
        return self.start() if self._rpyc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.close(grace=0)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT make :meth:`serve` return; the caller then runs :meth:`close`.

        The closing happens in the main thread, not here or in a helper thread: RPyC's
        ``ForkingServer.close`` restores its SIGCHLD handler, which only the main thread may.
        """

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %s: shutting down", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def serve_stdio(config: ServerConfig | None = None, rfile: Any = None, wfile: Any = None,
                attach: Any = None) -> None:
    """Serve one connection over a pair of pipes (stdin/stdout by default) until EOF.

    Used for SSH deployment: the protocol runs over the ssh channel, no port is opened.
    ``attach`` (an :class:`~rpycsvc.client.attach.AttachListener`) also serves the connections of
    its Unix socket, as this one, until we stop; it is closed (removed) when we do.
    """
    from rpycsvc.protocol.pipes import FastPipeStream

    cfg = config or ServerConfig(mode="stdio")
    pool = WorkerPool(cfg.effective_workers, threads=cfg.threads, endpoints=cfg.endpoints,
                      memory_limit=cfg.memory_limit)
    pool.start()
    runtime = Runtime(pool, classic=cfg.classic, address="stdio",
                      hosted=load_services(cfg.services, cfg.service_scope))
    rfile = rfile or os.fdopen(os.dup(sys.stdin.fileno()), "rb", buffering=0)
    wfile = wfile or os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    service = (ClassicComputeService if cfg.classic else ComputeService)(runtime)
    # Linear-time writes, and `last_activity` set whenever bytes arrive: a large message in
    # progress is the client speaking, not silence (the watchdog below counts bytes).
    stream = FastPipeStream(rfile, wfile)
    # (an ssh channel: authenticated by ssh, so full-size messages from the start)
    channel = FastChannel(stream, limit=cfg.max_message_size)
    conn = service._connect(channel, dict(PROTOCOL_CONFIG))
    if attach is not None:
        from rpycsvc.server.attach import serve_attached

        attach.start(lambda sock: serve_attached(sock, runtime, type(service),
                                                 cfg.max_message_size))
    if cfg.keepalive > 0:
        def watchdog() -> None:
            # A dead ssh link may go unnoticed by sshd for hours: the client pings us, and
            # silence for this long means it is gone. Stop, workers included.
            while time.monotonic() - stream.last_activity < cfg.keepalive:
                time.sleep(min(1.0, cfg.keepalive / 4))
            log.warning("no word from the client for %.0f s: stopping", cfg.keepalive)
            if attach is not None:
                attach.close()
            pool.close(grace=0)
            os._exit(3)

        threading.Thread(target=watchdog, name="rpycsvc-watchdog", daemon=True).start()
    try:
        conn.serve_all()
    finally:
        if attach is not None:
            attach.close()
        pool.close(grace=0)


def _registrar(cfg: ServerConfig) -> Any:
    if not cfg.register:
        return None
    from rpyc.utils.registry import TCPRegistryClient, UDPRegistryClient

    host = cfg.registry_host or ("127.0.0.1" if cfg.registry_type.upper() == "TCP" else
                                 "255.255.255.255")
    if cfg.registry_type.upper() == "TCP":
        return TCPRegistryClient(host, port=cfg.registry_port)
    return UDPRegistryClient(ip=host, port=cfg.registry_port)


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"
