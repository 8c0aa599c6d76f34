"""The rpycsvc server (:class:`Server`): listening, accepting, and its lifecycle.

:class:`Server` binds (127.0.0.1 by default), starts the worker pool, accepts connections
in a thread each, runs TLS and the rpycsvc handshake before RPyC, and on ``close()`` stops
accepting, lets running tasks finish within a grace period and stops the workers. How a
connection is admitted is :mod:`rpycsvc.server.admission`; the RPyC server classes that serve
it, :mod:`rpycsvc.server.listeners`; serving over pipes instead (SSH deployment),
:mod:`rpycsvc.server.stdio`.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

from rpyc.utils.helpers import classpartial

from rpycsvc.errors import ConfigError
from rpycsvc.protocol import sending
from rpycsvc.protocol.budget import InboundBudget
from rpycsvc.protocol.rpyc_connection import PROTOCOL_CONFIG
from rpycsvc.server.admission import _Counters, _Handshake
from rpycsvc.server.config import ServerConfig
from rpycsvc.server.hosted import load_services
from rpycsvc.server.listeners import _SERVERS, _registrar
from rpycsvc.server.pool import WorkerPool
from rpycsvc.server.service import ClassicComputeService, ComputeService, Runtime

log = logging.getLogger("rpycsvc.server")
#: How long a closing server waits for results still being written to their clients.
DRAIN_TIMEOUT = 5.0

#: serve() wakes at least this often (seconds) so signal handlers run promptly.
_WAKE = 0.2


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
        sending.drain(DRAIN_TIMEOUT)
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
