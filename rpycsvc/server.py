"""Listening, authentication and lifecycle of an rpycsvc server.

:class:`Server` binds (127.0.0.1 by default), starts the worker pool, accepts connections
in a thread each, runs TLS and the rpycsvc handshake before RPyC, and on ``close()`` stops
accepting, lets running tasks finish within a grace period and stops the workers.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from rpyc.utils.authenticators import AuthenticationError as RpycAuthError
from rpyc.utils.helpers import classpartial
from rpyc.utils.server import ForkingServer, OneShotServer, ThreadedServer

from .config import ServerConfig
from .errors import ConfigError
from .handshake import server_handshake, server_ssl_context
from .hosted import load_services
from .pool import WorkerPool
from .service import ClassicComputeService, ComputeService, Runtime
from .transport import FastChannel, FastSocketStream

log = logging.getLogger("rpycsvc.server")

#: serve() wakes at least this often (seconds) so signal handlers run promptly.
_WAKE = 0.2


class _Handshake:
    """rpyc authenticator: TLS (optional), then the rpycsvc hello and authkey challenge."""

    def __init__(self, config: ServerConfig, runtime: Runtime) -> None:
        self.config = config
        self.runtime = runtime
        self.ssl = None
        if config.ssl_certfile and config.ssl_keyfile:
            self.ssl = server_ssl_context(config.ssl_certfile, config.ssl_keyfile,
                                          config.ssl_cafile)
        self.pending = threading.BoundedSemaphore(max(1, config.max_pending))

    def __call__(self, sock: socket.socket) -> tuple[socket.socket, dict[str, Any]]:
        """TLS, then the hello; connections still proving who they are hold one of
        ``max_pending`` slots and have ``handshake_timeout`` seconds to finish."""
        peer = _peer(sock)
        if self.ssl is not None:
            with self._slot(peer):
                sock.settimeout(self.config.handshake_timeout)
                try:
                    sock = self.ssl.wrap_socket(sock, server_side=True)
                except (OSError, ValueError) as exc:
                    log.warning("TLS handshake with %s failed: %s", peer, exc)
                    raise RpycAuthError(str(exc)) from exc
        try:
            if self.config.authkey:
                with self._slot(peer):
                    creds = self._hello(sock)
            else:
                # nothing to prove: a plain RPyC client may stay silent until its first call
                creds = self._hello(sock)
        except RpycAuthError as exc:
            log.warning("refused %s: %s", peer, exc)
            raise
        return sock, creds

    def _hello(self, sock: socket.socket) -> dict[str, Any]:
        return server_handshake(sock, authkey=self.config.authkey,
                                timeout=self.config.handshake_timeout,
                                server_info=self.runtime.info())

    @contextmanager
    def _slot(self, peer: str) -> Iterator[None]:
        if not self.pending.acquire(blocking=False):
            log.warning("refusing %s: too many connections still in their handshake", peer)
            raise RpycAuthError("too many pending handshakes")
        try:
            yield
        finally:
            self.pending.release()


class _ServerMixin:
    """Our connection setup for RPyC's server classes: fast stream, no compression."""

    runtime: Runtime

    def _serve_client(self, sock: socket.socket, credentials: Any) -> None:
        peer = _peer(sock)
        creds = credentials or {}
        lane = (creds.get("client") or {}).get("lane")
        if lane is not None:  # not an RPyC connection: a client's direct lane to a worker
            try:
                self.runtime.attach_lane(sock, str(lane))
                log.debug("lane %s from %s handed to a worker", str(lane).split("/")[-1], peer)
            except Exception as exc:
                log.warning("refused a lane from %s: %s", peer, exc)
            return
        log.info("connection from %s (%s client)", peer,
                 "rpycsvc" if creds.get("client") else "plain rpyc")
        config = dict(self.protocol_config, credentials=creds,  # type: ignore[attr-defined]
                      endpoints=(sock.getsockname(), sock.getpeername()),
                      logger=self.logger)  # type: ignore[attr-defined]
        stream = FastSocketStream(sock, prefix=creds.get("prefix", b""))
        conn = self.service._connect(FastChannel(stream), config)  # type: ignore[attr-defined]
        try:
            self._handle_connection(conn)  # type: ignore[attr-defined]
        except (EOFError, OSError):
            pass  # the client went away
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

PROTOCOL_CONFIG = {
    "allow_public_attrs": True,
    "sync_request_timeout": None,  # compute calls take as long as their tasks
    "include_local_traceback": True,
}


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

    @property
    def address(self) -> str:
        """``host:port`` as clients should dial it (``[v6]:port`` for IPv6)."""
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

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
                authenticator=_Handshake(cfg, self.runtime),
                protocol_config=dict(PROTOCOL_CONFIG), logger=logging.getLogger("rpycsvc.rpyc"),
                auto_register=cfg.register, registrar=_registrar(cfg),
            )
        except OSError as exc:
            self.pool.close(grace=0)
            raise ConfigError(
                f"can't listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from exc
        self._rpyc.runtime = self.runtime
        self.runtime.lanes = cfg.lanes and cfg.mode == "threaded" and not cfg.uses_ssl \
            and _can_pass_fds()
        self._rpyc._listen()  # with port 0, the real port is known from here on
        self.runtime.address = self.address
        self._rpyc._register()
        self._thread = threading.Thread(target=self._accept_loop, name="rpycsvc-accept",
                                        daemon=True)
        self._thread.start()
        log.info("listening on %s with %d workers", self.address, self.pool.size)
        return self

    def _accept_loop(self) -> None:
        try:
            while self._rpyc.active:
                self._rpyc.accept()
        except EOFError:
            pass  # listener closed
        except Exception:
            if not self._closed.is_set():
                log.exception("accept loop failed")
        finally:
            if self.config.mode == "oneshot":
                self._stop.set()

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


def serve_stdio(config: ServerConfig | None = None, rfile: Any = None, wfile: Any = None) -> None:
    """Serve one connection over a pair of pipes (stdin/stdout by default) until EOF.

    Used for SSH deployment: the protocol runs over the ssh channel, no port is opened.
    """
    from rpyc.core.stream import PipeStream

    cfg = config or ServerConfig(mode="stdio")
    pool = WorkerPool(cfg.effective_workers, threads=cfg.threads, endpoints=cfg.endpoints,
                      memory_limit=cfg.memory_limit)
    pool.start()
    runtime = Runtime(pool, classic=cfg.classic, address="stdio",
                      hosted=load_services(cfg.services, cfg.service_scope))
    rfile = rfile or os.fdopen(os.dup(sys.stdin.fileno()), "rb", buffering=0)
    wfile = wfile or os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    service = (ClassicComputeService if cfg.classic else ComputeService)(runtime)
    heard = [time.monotonic()]

    class _Stream(PipeStream):
        def read(self, count: int) -> bytes:
            data: bytes = super().read(count)
            heard[0] = time.monotonic()
            return data

    conn = service._connect(FastChannel(_Stream(rfile, wfile)), dict(PROTOCOL_CONFIG))
    if cfg.keepalive > 0:
        def watchdog() -> None:
            # A dead ssh link may go unnoticed by sshd for hours: the client pings us, and
            # silence for this long means it is gone. Stop, workers included.
            while time.monotonic() - heard[0] < cfg.keepalive:
                time.sleep(min(1.0, cfg.keepalive / 4))
            log.warning("no word from the client for %.0f s: stopping", cfg.keepalive)
            pool.close(grace=0)
            os._exit(3)

        threading.Thread(target=watchdog, name="rpycsvc-watchdog", daemon=True).start()
    try:
        conn.serve_all()
    finally:
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


def _can_pass_fds() -> bool:
    """Lanes need ``SCM_RIGHTS`` (Linux, the BSDs, macOS; not Windows)."""
    return hasattr(socket, "AF_UNIX") and hasattr(socket, "SCM_RIGHTS") \
        and hasattr(socket.socket, "sendmsg")


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"
