"""Opening a :class:`~rpycsvc.client.connection.Client` over an already open stream: RPyC's
connection on rpycsvc's channel, then the hello that agrees on heartbeats and on module
forwarding.

The stream is a socket after :mod:`rpycsvc.protocol.handshake` (:mod:`rpycsvc.client.connect`)
or the pipes of an ssh session (:mod:`rpycsvc.client.attach`, :mod:`rpycsvc.deployment`). Kept
apart from the client itself: setting a connection up (which RPyC service, the timeouts that
bound the first exchange, the forwarding gate wired to the client's tasks) is one concept,
running tasks on an open one another.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from rpycsvc.client.connection import Client
from rpycsvc.client.environment import versions_of
from rpycsvc.client.output import OutputRouter
from rpycsvc.errors import RpycsvcTimeoutError
from rpycsvc.protocol import module_provider
from rpycsvc.protocol.liveness import (
    DEFAULT_LOST_AFTER,
    LiveChannel,
    LiveClassicClient,
    LiveVoidService,
    check_lost_after,
    heartbeat_interval,
)


def connect_stream(stream: Any, *, address: str, hello: dict[str, Any] | None = None,
                   router: OutputRouter | None = None,
                   lost_after: float | None = DEFAULT_LOST_AFTER,
                   hello_timeout: float | None = 30.0, forward_modules: bool = True,
                   forward_packages: Sequence[str] = (), **task_options: Any) -> Client:
    """A :class:`Client` over an already open RPyC stream (a socket after the handshake,
    or the pipes of an ssh session for deployed servers).

    ``lost_after``, ``forward_modules`` and ``forward_packages`` as for :func:`rpycsvc.connect`;
    ``hello_timeout`` bounds the first exchange."""
    lost_after = check_lost_after(lost_after)
    hello = dict(hello or {})
    router = router or OutputRouter()
    classic = hello.get("classic", True)
    # (a service-only server runs no code of ours: nothing to forward)
    modules = module_provider.provider(forward_packages) if forward_modules and classic else None
    service = LiveClassicClient if classic else LiveVoidService
    # The server may call back public methods of objects we hand it explicitly (an
    # output stream for redirected_stdout, sys.stdout in RPyC's tutorial); nothing else.
    try:
        # RPyC's on_connect asks the server for its root at once: bounded by hello_timeout
        # like hello itself (a server that froze right after accepting must not hang us).
        conn = service._connect(LiveChannel(stream), {"allow_pickle": False,
                                                      "allow_public_attrs": True,
                                                      "sync_request_timeout": hello_timeout})
    except BaseException as exc:
        stream.close()
        if isinstance(exc, TimeoutError):
            raise RpycsvcTimeoutError(f"{address} did not answer within {hello_timeout:g} s "
                                      "of connecting") from exc
        raise
    conn._config["sync_request_timeout"] = None  # from now on bounded by liveness instead
    conn.request_timeout = hello_timeout  # the liveness check starts after hello
    try:
        # (answers only while a task of ours runs on this connection: see below)
        gate = module_provider.ConnectionModules(modules, address) if modules is not None else None
        beat = heartbeat_interval(lost_after) if lost_after is not None \
            and not getattr(conn, "_bind_threads", False) else None
        reply = conn.root.hello(beat, gate is not None)
        hello.update(dict(reply))
        if not hello.get("cloudpickle"):  # a deployed server's hello: its stats say them
            hello.update(versions_of(conn))
    except RpycsvcTimeoutError as exc:
        conn.close()
        raise RpycsvcTimeoutError(f"{address} did not answer hello within "
                                  f"{hello_timeout:g} s") from exc
    except BaseException:
        conn.close()
        raise
    conn.request_timeout = None
    if not hello.get("classic", True):
        modules = None
    client = Client(conn, hello, address, router, task_options, lost_after=lost_after,
                    modules=modules, module_gate=gate)
    if gate is not None:
        ref = weakref.ref(client)

        def busy() -> bool:
            live = ref()
            return live is not None and bool(live._pending)

        gate.busy = busy
    return client

