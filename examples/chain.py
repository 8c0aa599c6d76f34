"""The link of ``pyro_chain.py``: a hosted object that passes a message on to the next server.

Each server of the chain hosts one ``Link``::

    PYTHONPATH=examples rpycsvc serve --service chain:Link

A client names each link and tells it where the next one is (``join``), then hands a
message to the first; every link adds itself to the message's path and calls the next
link, until the message reaches a link already on its path: the chain is closed.
"""

from __future__ import annotations

import os
import threading


class Link:
    """One server's link of the chain."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.name = ""
        self.next = ""

    def join(self, name: str, next_address: str) -> None:
        """Call this link ``name`` and pass messages on to the server at ``next_address``."""
        with self._lock:
            self.name, self.next = name, next_address

    def process(self, message: str, path: tuple[tuple[str, int], ...] = ()
                ) -> tuple[tuple[str, int], ...]:
        """Pass ``message`` along the chain; returns the path it took as ``(name, pid)``."""
        import rpycsvc

        with self._lock:
            name, next_address = self.name, self.next
        if not name:
            raise ValueError("this link has not joined a chain; call join(name, next) first")
        path = (*path, (name, os.getpid()))
        if any(seen == name for seen, _ in path[:-1]):
            return path  # back where it started: the chain is closed
        with rpycsvc.connect(next_address, timeout=10) as nxt:
            return tuple(tuple(hop) for hop in nxt.root.link.process(message, path))
