"""Runs on a host: the entry point deploy starts there, which reads deploy's settings and serves.

:func:`rpycsvc.deployment.launcher.deploy` starts :data:`ENTRY` through the bootstrap
(:mod:`rpycsvc.deployment.bootstrap`), sends its settings as one length-prefixed JSON
object and reads one answer (``{"socket": path or None}``); then RPyC runs over the same
ssh pipes. The server modules are imported only here, on the host.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

#: The entry point deploy runs on each host (``"module:function"``, see the bootstrap).
ENTRY = "rpycsvc.deployment.host:remote_main"
#: Length prefix of the JSON settings and answers exchanged with a remote server at start.
SETTINGS_LEN = struct.Struct(">Q")


def remote_main(rfile: Any, wfile: Any) -> int:
    """Runs on the host (the bootstrap's entry): read settings, serve over the ssh pipes."""
    from rpycsvc.server.config import ServerConfig
    from rpycsvc.server.stdio import serve_stdio

    fd = rfile.fileno()
    head = _read_exact(fd, SETTINGS_LEN.size)
    settings = json.loads(_read_exact(fd, SETTINGS_LEN.unpack(head)[0]))
    attach = settings.pop("attach", False)
    cfg = ServerConfig(mode="stdio", **settings)
    listener = None
    if attach:  # more clients, through a private socket (rpycsvc.client.attach)
        from rpycsvc.server.attach import open_listener

        listener = open_listener()
    answer = json.dumps({"socket": listener.path if listener else None}).encode()
    wfile.write(SETTINGS_LEN.pack(len(answer)) + answer)
    wfile.flush()
    serve_stdio(cfg, rfile, wfile, attach=listener)
    return 0


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("the deploying client went away")
        buf += chunk
    return buf

