"""HTML cards for Jupyter: what ``Cluster``, ``Client`` and ``TaskFuture`` show as ``_repr_html_``.

A cluster's card lists each server with its host, workers, and tasks running, queued,
done and failed (from ``stats()``, one round trip per server when the card is drawn), as
Dask's client card does; a server that is down shows why. A future's card shows its state,
where it runs and its result or error. Everything from a server is escaped: a host name or
a result's ``repr`` is text, never markup.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any, Protocol


# What a card reads of the object it draws (a Cluster, a Client, a TaskFuture: the modules
# that define them draw their cards with this one, so it names them only by what it needs).
class _ClusterView(Protocol):
    @property
    def unreachable(self) -> Mapping[str, BaseException]: ...

    def stats(self) -> Mapping[str, Any]: ...


class _ClientView(Protocol):
    address: str
    lost: BaseException | None

    @property
    def closed(self) -> bool: ...

    def stats(self) -> dict[str, Any]: ...


class _FutureView(Protocol):
    address: str | None
    id: str

    def cancelled(self) -> bool: ...

    def done(self) -> bool: ...

    def running(self) -> bool: ...

    def result(self, timeout: float | None = None) -> Any: ...

    def exception(self, timeout: float | None = None) -> BaseException | None: ...


#: Columns of the server table: (title, stats key).
_COLUMNS = (
    ("Workers", "workers"),
    ("Threads", "threads"),
    ("Running", "tasks_running"),
    ("Queued", "tasks_queued"),
    ("Done", "tasks_done"),
    ("Failed", "tasks_failed"),
)
#: Longest ``repr`` of a result shown on a future's card.
MAX_REPR = 200

_STYLE = ("font-family: var(--jp-ui-font-family, sans-serif); font-size: 13px; "
          "border-left: 3px solid #cd5c0e; padding: 4px 10px; margin: 2px 0")
_STATE_COLOURS = {"pending": "#888", "running": "#1f77b4", "finished": "#2ca02c",
                  "error": "#d62728", "cancelled": "#888"}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)) or n <= 0:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # (unreachable)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _server_rows(stats: dict[str, Any]) -> tuple[list[str], dict[str, int]]:
    """One ``<tr>`` per server, and the totals of the counted columns over servers up."""
    rows: list[str] = []
    totals = {key: 0 for _, key in _COLUMNS}
    for address, info in stats.items():
        if isinstance(info, BaseException):
            why = f"{type(info).__name__}: {info}"
            rows.append(f"<tr><td>{_e(address)}</td><td style='color:#d62728'>down</td>"
                        f"<td colspan='{len(_COLUMNS) + 3}' style='text-align:left'>"
                        f"{_e(why)}</td></tr>")
            continue
        cells = []
        for _, key in _COLUMNS:
            value = info.get(key, "")
            if isinstance(value, int):
                totals[key] += value
            cells.append(f"<td>{_e(value)}</td>")
        host = f"{info.get('host', '?')} (pid {info.get('pid', '?')})"
        rows.append(
            f"<tr><td>{_e(address)}</td><td style='color:#2ca02c'>up</td>"
            f"<td style='text-align:left'>{_e(host)}</td>{''.join(cells)}"
            f"<td>{_e(_size(info.get('rss_total_bytes')))}</td>"
            f"<td>{_e(_duration(info.get('uptime')))}</td></tr>")
    return rows, totals


def _table(rows: list[str]) -> str:
    head = "".join(f"<th>{t}</th>" for t, _ in _COLUMNS)
    return ("<table style='border-collapse: collapse; text-align: right'>"
            "<thead><tr><th style='text-align:left'>Server</th><th>Status</th>"
            f"<th style='text-align:left'>Host</th>{head}<th>Memory</th><th>Uptime</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def cluster_html(cluster: _ClusterView) -> str:
    """The card of a :class:`~rpycsvc.Cluster`: a summary line and a table of its servers."""
    stats: dict[str, Any] = dict(cluster.stats())
    for address, exc in cluster.unreachable.items():  # never connected: not in stats()
        stats.setdefault(address, exc)
    rows, totals = _server_rows(stats)
    up = sum(1 for v in stats.values() if not isinstance(v, BaseException))
    summary = (f"{up} of {len(stats)} servers up, {totals['workers']} workers, "
               f"{totals['threads']} threads; tasks: {totals['tasks_running']} running, "
               f"{totals['tasks_queued']} queued, {totals['tasks_done']} done, "
               f"{totals['tasks_failed']} failed")
    return (f"<div style='{_STYLE}'><b>rpycsvc.Cluster</b> "
            f"<span>{_e(summary)}</span>{_table(rows)}</div>")


def client_html(client: _ClientView) -> str:
    """The card of one :class:`~rpycsvc.Client`: its server's row (or why it is closed)."""
    info: Any
    if client.closed:
        info = client.lost or RuntimeError("closed")
    else:
        try:
            info = client.stats()
        except Exception as exc:  # the card must show, whatever the connection does
            info = exc
    rows, _ = _server_rows({client.address: info})
    versions = ""
    if isinstance(info, dict):
        versions = (f"Python {info.get('python_version', '?')}, rpycsvc "
                    f"{info.get('rpycsvc_version', '?')}, {info.get('cores', '?')} cores")
    return (f"<div style='{_STYLE}'><b>rpycsvc.Client</b> <span>{_e(versions)}</span>"
            f"{_table(rows)}</div>")


def future_state(fut: _FutureView) -> str:
    """``pending``, ``running``, ``finished``, ``error`` or ``cancelled``."""
    if fut.cancelled():
        return "cancelled"
    if fut.done():
        return "error" if fut.exception() is not None else "finished"
    return "running" if fut.running() else "pending"


def future_html(fut: _FutureView) -> str:
    """The card of a :class:`~rpycsvc.TaskFuture`: state, server, result or error."""
    state = future_state(fut)
    parts = [f"<b>rpycsvc.TaskFuture</b> <span style='color:{_STATE_COLOURS[state]}'>"
             f"<b>{state}</b></span>"]
    if fut.address:
        parts.append(f"on {_e(fut.address)}")
    parts.append(f"<span style='color:#888'>id {_e(fut.id)}</span>")
    detail = ""
    if state == "finished":
        text = repr(fut.result())
        if len(text) > MAX_REPR:
            text = text[:MAX_REPR] + "…"
        detail = f"<div>result: <code>{_e(text)}</code></div>"
    elif state == "error":
        exc = fut.exception()
        detail = f"<div>error: <code>{_e(type(exc).__name__)}: {_e(exc)}</code></div>"
    return f"<div style='{_STYLE}'>{' '.join(parts)}{detail}</div>"
