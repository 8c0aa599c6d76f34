"""A small progress bar for ``Cluster.map(..., progress=True)``: done/total, rate, ETA,
and how many results each server delivered. Drawn on stderr at most ten times a second."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from typing import TextIO


class Progress:
    def __init__(self, total: int | None, stream: TextIO | None = None, width: int = 24) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.width = width
        self.done = 0
        self.per_server: Counter[str] = Counter()
        self.started = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def update(self, n: int, server: str) -> None:
        with self._lock:
            self.done += n
            self.per_server[server] += n
            now = time.monotonic()
            if now - self._last >= 0.1:
                self._last = now
                self._draw(now)

    def render(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_s = f"{eta:5.1f}s" if eta != float("inf") else "  ?  "
            head = f"[{bar}] {self.done}/{self.total}"
        else:
            head, eta_s = f"{self.done}/?", "  ?  "
        servers = " ".join(f"{addr}:{n}" for addr, n in sorted(self.per_server.items()))
        return f"{head} {rate:,.0f}/s ETA {eta_s} | {servers}"

    def _draw(self, now: float) -> None:
        try:
            self.stream.write("\r" + self.render(now) + "\x1b[K")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        with self._lock:
            self._draw(time.monotonic())
        try:
            self.stream.write("\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass
