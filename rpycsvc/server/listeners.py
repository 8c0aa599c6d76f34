"""RPyC's threaded, forking and one-shot servers, with rpycsvc's connection setup.

That setup is the fast stream, no compression and bounded frames.
:class:`~rpycsvc.server.server.Server` picks one by ``ServerConfig.mode`` from
:data:`_SERVERS` and runs its accept loop itself.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from rpyc.utils.server import ForkingServer, OneShotServer, ThreadedServer

from rpycsvc.protocol.budget import InboundBudget
from rpycsvc.protocol.channel import FastChannel
from rpycsvc.protocol.limits import PREAUTH_MAX_MESSAGE
from rpycsvc.protocol.socket_stream import FastSocketStream
from rpycsvc.server.admission import _peer
from rpycsvc.server.config import ServerConfig
from rpycsvc.server.service import Runtime

log = logging.getLogger("rpycsvc.server")


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


def _registrar(cfg: ServerConfig) -> Any:
    if not cfg.register:
        return None
    from rpyc.utils.registry import TCPRegistryClient, UDPRegistryClient

    host = cfg.registry_host or ("127.0.0.1" if cfg.registry_type.upper() == "TCP" else
                                 "255.255.255.255")
    if cfg.registry_type.upper() == "TCP":
        return TCPRegistryClient(host, port=cfg.registry_port)
    return UDPRegistryClient(ip=host, port=cfg.registry_port)
