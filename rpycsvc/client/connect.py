"""``connect()``: a server's address to a :class:`~rpycsvc.client.connection.Client`.

``"host"``, ``"host:port"`` or ``"[v6]:port"`` is dialled over TCP (TLS with ``ssl``), the
handshake checks versions and credentials, and the connection is opened over the socket;
a deployed server's ``ssh://`` or ``unix://`` attach address goes to
:mod:`rpycsvc.client.attach`.
"""

from __future__ import annotations

import socket
import ssl as _ssl
from collections.abc import Sequence
from typing import Any

from rpycsvc.client.attach import connect_attached
from rpycsvc.client.connection import Client
from rpycsvc.client.opening import connect_stream
from rpycsvc.client.output import OutputRouter
from rpycsvc.client.taskoptions import check_options
from rpycsvc.errors import ConfigError, ConnectError, RpycsvcTimeoutError
from rpycsvc.protocol.handshake import client_handshake, client_ssl_context
from rpycsvc.protocol.liveness import DEFAULT_LOST_AFTER, check_lost_after
from rpycsvc.protocol.socket_stream import FastSocketStream

DEFAULT_PORT = 18812


def parse_address(address: str, port: int | None = None) -> tuple[str, int]:
    """``"host"``, ``"host:port"`` or ``"[v6]:port"`` → ``(host, port)``."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        p = rest.lstrip(":")
    elif address.count(":") == 1:
        host, p = address.split(":")
    else:
        host, p = address, ""
    try:
        return host or "127.0.0.1", int(p) if p else (port or DEFAULT_PORT)
    except ValueError:
        raise ConfigError(f"bad server address {address!r}: expected host or host:port") from None


def connect(
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    timeout: float = 10.0,
    authkey: str | bytes | None = None,
    ssl: _ssl.SSLContext | bool | None = None,
    server_hostname: str | None = None,
    output: str = "stream",
    prefix: str = "[{address}] ",
    forward_logging: bool = False,
    lanes: bool | None = None,
    lost_after: float | None = DEFAULT_LOST_AFTER,
    forward_modules: bool = True,
    forward_packages: Sequence[str] = (),
    **task_options: Any,
) -> Client:
    """Connect to an rpycsvc server and check versions (and credentials).

    ``host`` may be ``"host:port"``, or a deployed server's attach address
    ``"ssh://[user@]host[:port]/path"`` (then ``ssh_command``/``ssh_options`` keywords
    apply: see :mod:`rpycsvc.client.attach`). ``authkey`` answers the server's challenge (the key is
    never sent); ``ssl`` is an ``ssl.SSLContext`` or ``True`` for the system's default CAs.
    ``output`` decides where tasks' stdout/stderr go: ``"stream"`` (to ours, each line
    prefixed with ``prefix``), ``"capture"`` (on ``future.stdout``/``future.stderr``) or
    ``"discard"``. With ``forward_logging``, ``logging`` records emitted in tasks are handed
    to the local logger of the same name, with the server as ``record.server``. Other
    keywords set default task options (``timeout``, ``mode``). ``lanes`` is deprecated and
    ignored (every task takes the one task path now).

    ``lost_after`` (seconds, default 10) bounds how long the server may stay silent: the
    server sends a heartbeat about every second from a thread of its own (a long classic
    call or a busy connection doesn't delay it), and when nothing has arrived for
    ``lost_after`` seconds the server is declared lost — frozen (SIGSTOP, a paused VM) or
    cut off without a reset. Every task in flight and every waiting classic call then fails
    with ``ServerLostError``. ``None`` turns the check off. Classic calls have no time
    limit of their own (RPyC's 30 s ``sync_request_timeout`` does not apply).

    With ``forward_modules`` (the default), a task that needs a module of this program's
    own project which the server lacks gets it from here during its import (see
    :mod:`rpycsvc.protocol.forwarding`); ``forward_packages`` names installed pure-Python
    distributions (or their top-level modules) that may be sent the same way.
    """
    if lanes is not None:
        import warnings

        warnings.warn("connect(lanes=...) is deprecated and ignored: every task takes the one "
                      "task path now; drop the argument", DeprecationWarning, stacklevel=2)
    if host.startswith(("ssh://", "unix://")):  # a deployed server's socket: rpycsvc.client.attach
        return connect_attached(host, timeout=timeout, ssl=ssl, output=output, prefix=prefix,
                                forward_logging=forward_logging, lost_after=lost_after,
                                forward_modules=forward_modules,
                                forward_packages=forward_packages, **task_options)
    h, p = parse_address(host, port)
    address = f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
    if isinstance(authkey, bytes):
        authkey = authkey.decode()
    if authkey is None:
        import os

        authkey = os.environ.get("RPYCSVC_AUTHKEY") or None
    router = OutputRouter(output, prefix, forward_logging)
    check_options({"output": output, **task_options})
    lost_after = check_lost_after(lost_after)
    try:
        sock = socket.create_connection((h, p), timeout=timeout)
    except socket.timeout as exc:
        raise RpycsvcTimeoutError(f"connecting to {address} timed out after {timeout:g} s") from exc
    except OSError as exc:
        raise ConnectError(
            f"can't connect to {address}: {exc.strerror or exc}. Is an rpycsvc server "
            "running there (rpycsvc serve --port ...)?", address=address) from exc
    try:
        if ssl:
            ctx = ssl if isinstance(ssl, _ssl.SSLContext) else client_ssl_context()
            try:
                sock = ctx.wrap_socket(sock, server_hostname=server_hostname or h)
            except (OSError, _ssl.SSLError) as exc:
                from rpycsvc.errors import AuthenticationError
                from rpycsvc.protocol.tls import handshake_failure

                raise AuthenticationError(handshake_failure(exc, address, ctx),
                                          address=address) from exc
        hello = client_handshake(sock, address=address, authkey=authkey, timeout=timeout)
        return connect_stream(FastSocketStream(sock), address=address, hello=hello,
                              router=router, lost_after=lost_after, hello_timeout=timeout,
                              forward_modules=forward_modules,
                              forward_packages=forward_packages, **task_options)
    except EOFError as exc:  # e.g. the server shut down while we were setting up
        sock.close()
        raise ConnectError(f"{address} closed the connection while we were connecting: {exc}",
                           address=address) from exc
    except BaseException:
        sock.close()
        raise

