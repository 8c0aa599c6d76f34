"""The progress bar of ``Cluster.map(..., progress=True)`` and ``map_reduce(..., progress=True)``:
done/total, rate, ETA, and how many results each server delivered.

On a terminal the bar is one line on stderr, redrawn in place at most ten times a second
and kept below remote output (see :mod:`rpycsvc.client.output`). Anywhere else — a pipe, a file,
a CI log — it writes no carriage returns and no escape codes: nothing while the work runs,
then one plain summary line when it ends, so a log still says what happened.

In a Jupyter kernel the bar is a notebook widget drawn by ``tqdm.auto`` (install
``rpycsvc[notebook]``: tqdm and ipywidgets), with the per-server counts as its postfix;
without them the kernel gets the summary line, as a log does.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Any, TextIO

from rpycsvc.client import output

#: Seconds between redraws of a live bar.
REDRAW_EVERY = 0.1
#: Erase from the cursor to the end of the line (ANSI "EL"); only ever sent to a terminal.
ERASE_LINE = "\x1b[K"


def is_terminal(stream: TextIO) -> bool:
    """True if ``stream`` is a terminal (False for pipes, files, closed or odd streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel (ipykernel's shell), where a widget can show a bar."""
    ipython = sys.modules.get("IPython")
    if ipython is None:  # (never imported: not in IPython, and we don't import it)
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def notebook_bar(total: int | None, label: str = "") -> Any:
    """A ``tqdm.auto`` bar (a widget in a notebook), or None without tqdm and ipywidgets
    (tqdm alone would fall back to text on stderr, which a cell can't redraw in place)."""
    import importlib
    import warnings

    try:
        importlib.import_module("ipywidgets")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tqdm's "IProgress not found" if widgets broke
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=label or None, unit="it", leave=True)
    except Exception:  # missing, or a broken widget stack: the map must not fail over it
        return None


def _columns(stream: TextIO) -> int:
    """The terminal's width, so a long bar is cut instead of wrapping (``\\r`` only goes
    back to the start of the last physical line, so a wrapped bar would smear)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return 80


class Progress:
    """One bar. ``update`` counts finished items; ``close`` ends the bar.

    ``live`` chooses between the redrawn bar and the single final line; the default
    (None) asks ``stream.isatty()``, as tqdm does with ``disable=None``. With neither
    ``stream`` nor ``live`` given, in a Jupyter kernel the bar is a notebook widget
    (:func:`notebook_bar`) when tqdm and ipywidgets are installed.
    """

    def __init__(self, total: int | None, stream: TextIO | None = None, width: int = 24,
                 label: str = "", live: bool | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.width = width
        self.label = label
        self.live = is_terminal(self.stream) if live is None else live
        self.done = 0
        self.per_server: Counter[str] = Counter()
        self.started = time.monotonic()
        self._last = 0.0
        self._shown = False  # a live bar is on the screen now
        self._closed = False
        #: the notebook widget bar, when there is one (then nothing is written to stream)
        self.widget: Any = None
        if stream is None and live is None and in_jupyter_kernel():
            self.widget = notebook_bar(total, label)
            if self.widget is not None:
                self.live = False
        if self.live:
            output.show_live_line(self)

    def update(self, n: int, server: str) -> None:
        """``n`` more items finished, delivered by ``server``."""
        with output.terminal_lock:
            self.done += n
            self.per_server[server] += n
            if self.widget is not None:
                self._update_widget(n)
                return
            now = time.monotonic()
            if self.live and not self._closed and now - self._last >= REDRAW_EVERY:
                self._last = now
                self._draw(now)

    def render(self, now: float | None = None) -> str:
        """The bar's text (no control characters)."""
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
        label = f"{self.label}: " if self.label else ""
        return f"{label}{head} {rate:,.0f}/s ETA {eta_s} | {servers}"

    def summary(self, now: float | None = None) -> str:
        """The one line a non-terminal gets at the end: counts, time, rate, servers."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        servers = " ".join(f"{addr}:{n}" for addr, n in sorted(self.per_server.items()))
        label = f"{self.label}: " if self.label else ""
        return (f"{label}{self.done}{of} done in {elapsed:.1f}s "
                f"({self.done / elapsed:,.0f}/s) | {servers}").rstrip(" |")

    def _update_widget(self, n: int) -> None:
        try:  # (tqdm redraws at most every 0.1 s itself)
            self.widget.set_postfix_str(self._servers_text(), refresh=False)
            self.widget.update(n)
        except Exception:  # the map must not fail over its bar
            pass

    def _servers_text(self) -> str:
        return " ".join(f"{addr}:{n}" for addr, n in sorted(self.per_server.items()))

    # -- the output.LiveLine interface (called with output.terminal_lock held) -----------------
    def clear(self) -> None:
        """Take the bar off the screen so a line of other output can take its place."""
        if self._shown:
            self._write("\r" + ERASE_LINE)
            self._shown = False

    def redraw(self) -> None:
        """Draw the bar again (below what was just printed)."""
        if not self._closed:
            self._draw(time.monotonic())

    def _draw(self, now: float) -> None:
        text = self.render(now)[: max(1, _columns(self.stream) - 1)]
        self._write("\r" + text + ERASE_LINE)
        self._shown = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr went away; the map itself must not fail over its bar

    def close(self) -> None:
        """Final state: a live bar is drawn once more and left on its own line; otherwise the
        summary line is written. Idempotent."""
        with output.terminal_lock:
            if self._closed:
                return
            if self.widget is not None:
                self._closed = True
                try:
                    self.widget.set_postfix_str(self._servers_text(), refresh=False)
                    self.widget.close()  # (a notebook bar stays, green or red, in its cell)
                except Exception:
                    pass
                return
            if self.live:
                self._draw(time.monotonic())
                self._closed = True
                self._write("\n")
                output.hide_live_line(self)
            else:
                self._closed = True
                self._write(self.summary() + "\n")
