"""Where remote stdout/stderr goes on the client: streamed with a prefix, captured, or dropped.

The worker sends whole lines only, and each batch is written here with one ``write`` under
a lock, so lines of concurrent tasks never interleave inside a line.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from .errors import ConfigError

MODES = ("stream", "capture", "discard")


class OutputRouter:
    """Routes one client's remote output. ``prefix`` may use ``{address}`` and ``{task}``."""

    def __init__(self, mode: str = "stream", prefix: str = "[{address}] ",
                 forward_logging: bool = False) -> None:
        if mode not in MODES:
            raise ConfigError(f"output must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode = mode
        self.prefix = prefix
        self.forward_logging = forward_logging
        self._lock = threading.Lock()

    def log(self, address: str, key: int, payload: bytes) -> None:
        """Hand a task's logging record to the local logger of the same name.

        The record gets ``server`` (the address) and ``task`` attributes, so handlers and
        formatters can show where it came from (``%(server)s``).
        """
        import logging
        import pickle

        data = pickle.loads(payload)
        data.update(server=address, task=key)
        logger = logging.getLogger(data.get("name") or "root")
        if logger.isEnabledFor(int(data.get("levelno") or 0)):
            logger.handle(logging.makeLogRecord(data))

    def emit(self, address: str, key: int, fd: int, text: str, mode: str, sink: Any) -> None:
        """Deliver ``text`` (whole lines, except at a task's end) from task ``key``."""
        if mode == "discard" or not text:
            return
        if mode == "capture":
            if sink is not None:
                attr = "stdout" if fd == 1 else "stderr"
                with self._lock:
                    setattr(sink, attr, getattr(sink, attr, "") + text)
            return
        head = self.prefix.format(address=address, task=key)
        lines = text.splitlines(keepends=True)
        block = "".join(head + (ln if ln.endswith("\n") else ln + "\n") for ln in lines)
        stream = sys.stdout if fd == 1 else sys.stderr
        with self._lock:
            try:
                stream.write(block)
                stream.flush()
            except (OSError, ValueError):
                pass  # our own stdout is closed; nothing sensible to do
