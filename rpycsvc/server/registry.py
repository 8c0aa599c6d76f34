"""RPyC's registry, served by rpycsvc: ``rpycsvc registry``.

The registry is ``rpyc.utils.registry`` unchanged on the wire, so plain RPyC tools
(``rpyc.discover``, ``rpyc_registry``) interoperate. What we add: a bind address that
defaults to 127.0.0.1 (``rpyc_registry`` always binds every interface), a per-request
timeout so one silent client can't stall the registry. Asking a registry for the rpycsvc
servers it knows is client-side: :func:`rpycsvc.client.discovery.discover`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from types import FrameType
from typing import Any

from rpyc.utils.registry import REGISTRY_PORT, TCPRegistryServer, UDPRegistryServer

from rpycsvc.errors import ConfigError
from rpycsvc.server.config import is_loopback

__all__ = ["SERVICE_NAMES", "add_arguments", "free_port", "run", "start_registry",
           "stop_registry"]

log = logging.getLogger("rpycsvc.registry")

#: What rpycsvc servers register as: RPyC derives a service's name from its class name
#: (``ClassicComputeService`` → ``CLASSICCOMPUTE``; ``--no-classic`` → ``COMPUTE``); a
#: classic server also registers as ``SLAVE``, RPyC's classic name, for ``rpyc.discover``.
SERVICE_NAMES = ("CLASSICCOMPUTE", "COMPUTE", "SLAVE")

# --help shows this as written: plain text, no reST or Markdown backticks
DESCRIPTION = """\
Run an RPyC registry so servers started with "rpycsvc serve --register" can be found by
"rpycsvc status --discover", "rpycsvc top --discover" and rpycsvc.Cluster.discover().

It speaks RPyC's registry protocol (rpyc.utils.registry). It binds 127.0.0.1 by default:
the registry has no authentication, so anyone who can reach it can announce a server.
The first line on stdout is the address it listens on (host:port); SIGTERM or Ctrl-C
stops it (exit 0). Servers re-register every 60 s; entries not refreshed within
--timeout seconds are dropped.

Classic servers also register as SLAVE, the name rpyc_classic servers use, so
rpyc.discover("SLAVE") and rpyc.classic-era tools find them; --discover looks up only
rpycsvc's own names (CLASSICCOMPUTE, COMPUTE), so it never lists an rpyc_classic server.

TCP (the default here) is the simplest: start servers with --register --registry-type TCP
--registry-host HOST --registry-port PORT. UDP answers broadcasts on a LAN, which only
reach a registry bound to 0.0.0.0 (or the broadcast interface), never one on 127.0.0.1."""

#: How often (seconds) the serving loop wakes to notice it was asked to stop.
_WAKE = 0.5


class _TCPRegistry(TCPRegistryServer):
    """RPyC's TCP registry with a read timeout on accepted sockets.

    Upstream reads each request with a blocking ``recv`` in its only thread, so a client
    that connects and sends nothing would stop the registry for good.
    """

    TIMEOUT = _WAKE

    def _recv(self) -> tuple[bytes, Any]:
        sock2, _ = self.sock.accept()
        sock2.settimeout(1.0)  # a registrar sends its request right after connecting
        try:
            addrinfo = sock2.getpeername()
            data = sock2.recv(1500)
        except OSError:
            sock2.close()
            raise
        self._connected_sockets[addrinfo] = sock2
        return data, addrinfo


class _UDPRegistry(UDPRegistryServer):
    TIMEOUT = _WAKE


def start_registry(host: str = "127.0.0.1", port: int = REGISTRY_PORT, mode: str = "TCP",
                   pruning_timeout: float | None = None) -> tuple[Any, threading.Thread]:
    """Bind a registry and serve it in a daemon thread; returns ``(server, thread)``.

    ``port`` 0 picks a free port (read ``server.port``). Stop with :func:`stop_registry`.
    """
    cls: Any = {"TCP": _TCPRegistry, "UDP": _UDPRegistry}.get(mode.upper())
    if cls is None:
        raise ConfigError(f"registry mode must be TCP or UDP; got {mode!r}")
    try:
        server = cls(host=host, port=port, pruning_timeout=pruning_timeout,
                     logger=logging.getLogger(f"rpycsvc.registry.{mode.lower()}"))
    except OSError as exc:
        raise ConfigError(f"can't bind the registry to {host}:{port} ({mode}): "
                          f"{exc.strerror or exc}") from exc
    # Upstream's start() sets ``active`` itself, inside the thread: a stop requested before
    # the thread got that far would be undone. So: active first, then the loop.
    server.active = True
    thread = threading.Thread(target=_serve, args=(server,), name="rpycsvc-registry",
                              daemon=True)
    thread.start()
    return server, thread


def _serve(server: Any) -> None:
    try:
        server._work()
    except Exception:
        log.exception("the registry stopped on an error")
    finally:
        server.active = False
        server.sock.close()


def stop_registry(server: Any, thread: threading.Thread, timeout: float = 5.0) -> None:
    """Ask the registry loop to stop and wait (bounded) until it has closed its socket."""
    server.active = False
    thread.join(timeout)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 for every interface (default: %(default)s)")
    p.add_argument("-p", "--port", type=int, default=REGISTRY_PORT,
                   help="port to bind; 0 picks a free one (default: %(default)s)")
    p.add_argument("-m", "--mode", choices=("UDP", "TCP"), default="TCP", type=str.upper,
                   help="TCP works on one host and across routers; UDP answers LAN broadcasts "
                   "(rpyc_registry's default; needs --host 0.0.0.0 to hear them) "
                   "(default: %(default)s)")
    p.add_argument("-t", "--timeout", type=float, default=240.0, metavar="SECONDS",
                   help="seconds an entry lives without being refreshed (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="log errors only, as rpyc_registry -q (default: off)")


def run(args: argparse.Namespace) -> int:
    """``rpycsvc registry``: bind, print the address, serve until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be a positive number of seconds; got {args.timeout!r}")
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Handlers before the address line: a script may signal us as soon as it has read it.
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    server, thread = start_registry(args.host, args.port, args.mode, args.timeout)
    host = server.sock.getsockname()[0]
    print(f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}", flush=True)
    log.info("%s registry listening on %s:%s", args.mode, host, server.port)
    if not is_loopback(host):
        log.warning("the registry on %s has no authentication: anyone who can reach it can "
                    "announce a server, and clients that --discover will connect to it", host)
    while not stop.wait(_WAKE) and thread.is_alive():
        pass
    stop_registry(server, thread)
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (for tests and scripts that must name one up front)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
