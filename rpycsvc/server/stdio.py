"""Serving one connection over pipes (an ssh channel's stdin/stdout): how a deployed server runs.

It has its own worker pool and no listening socket.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

from rpycsvc.protocol.channel import FastChannel
from rpycsvc.protocol.rpyc_connection import PROTOCOL_CONFIG
from rpycsvc.server.config import ServerConfig
from rpycsvc.server.hosted import load_services
from rpycsvc.server.pool import WorkerPool
from rpycsvc.server.service import ClassicComputeService, ComputeService, Runtime

log = logging.getLogger("rpycsvc.server")


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
            # silence for this long means it is gone. Stop, workers included. Silence is
            # nothing new in the pipe: while the serving thread is busy (a long classic
            # call, a large task handed to a worker) the client's pings wait there unread,
            # and a pipe too full to take them is our silence, not the client's.
            heard, before = stream.last_activity, None
            while time.monotonic() - max(heard, stream.last_activity) < cfg.keepalive:
                time.sleep(min(1.0, cfg.keepalive / 4))
                now = stream.unread()
                if now is not None and (now[1] or (before is not None and now[0] > before[0])):
                    heard = time.monotonic()
                before = now
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
