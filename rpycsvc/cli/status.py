"""``rpycsvc status``: one table of servers' state, probed in parallel with a deadline.

:func:`probe` asks one server for its stats and round-trip time; :func:`probe_all` runs
probes side by side so one dead or slow host costs ``timeout``, not ``n * timeout``;
:func:`format_table` is pure so it is tested without sockets. The number formatters here
are shared with ``rpycsvc top``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rpycsvc.client.output import write_stdout

DESCRIPTION = """\
Show the state of rpycsvc servers: address, versions (rpycsvc/rpyc/python), cores,
workers, tasks running/queued/done/failed, load average, memory (RSS of the server and
its workers), uptime and round-trip time.

Servers are probed in parallel; a server that can't be reached within --timeout is shown
as DOWN with the reason, and the exit status is then 1 (0 when every server answered).
HOST may be host, host:port (default port 18812) or @FILE, a hosts file with one address
per line; a server named more than once is probed once and shown on one row. --discover
adds the servers an RPyC registry knows (see "rpycsvc registry").
The authkey comes from --authkey or, better, RPYCSVC_AUTHKEY."""


@dataclass
class ServerStatus:
    """What one probe found: ``stats`` and ``rtt`` (seconds), or ``error``."""

    address: str
    stats: dict[str, Any] = field(default_factory=dict)
    rtt: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_json(self) -> dict[str, Any]:
        return {"address": self.address, "ok": self.ok, "error": self.error,
                "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
                "stats": self.stats or None}


def _limit_calls(client: Any, timeout: float) -> None:
    # RPyC waits 30 s for a synchronous reply by default; a status probe must not.
    try:
        client.conn._config["sync_request_timeout"] = timeout
    except (AttributeError, TypeError):
        pass


def probe(address: str, timeout: float = 5.0, authkey: str | None = None) -> ServerStatus:
    """Connect to ``address``, time a few round trips, read its stats, disconnect.

    The round-trip time is the best of three calls to the already-resolved ``ping``
    method: one request and one reply each, without RPyC's attribute lookup.
    """
    from rpycsvc.client.connect import connect

    try:
        client = connect(address, timeout=timeout, authkey=authkey, output="discard")
    except Exception as exc:  # connect translates socket errors; anything else is news
        return ServerStatus(address, error=_reason(exc))
    try:
        _limit_calls(client, timeout)
        ping = client.conn.root.ping
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            ping()
            best = min(best, time.perf_counter() - t0)
        return ServerStatus(client.address, stats=client.stats(), rtt=best)
    except Exception as exc:
        return ServerStatus(client.address, error=_reason(exc))
    finally:
        client.close(timeout=timeout)


def probe_all(addresses: list[str], timeout: float = 5.0,
              authkey: str | None = None) -> list[ServerStatus]:
    """:func:`probe` every address at once; results in the given order.

    A probe still running after ``2 * timeout + 1`` seconds (connect, then calls) is
    reported as timed out; its daemon thread is left to finish on its own.
    """
    results: dict[int, ServerStatus] = {}

    def one(i: int, addr: str) -> None:
        results[i] = probe(addr, timeout, authkey)

    threads = [threading.Thread(target=one, args=(i, a), daemon=True, name=f"probe-{a}")
               for i, a in enumerate(addresses)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 2 * timeout + 1
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [results.get(i, ServerStatus(a, error=f"no answer within {2 * timeout + 1:g} s"))
            for i, a in enumerate(addresses)]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- formatting (pure) -------------------------------------------------------------------------
def human_bytes(n: float | None) -> str:
    """``123456789`` → ``"118M"`` (binary units, as ``top`` and ``free -h`` show them)."""
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or n >= 10 else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.0f}T"  # pragma: no cover


def human_duration(seconds: float | None) -> str:
    """``3725`` → ``"1h02m"``; short and sortable by eye."""
    if seconds is None:
        return "-"
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def human_rtt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.2f}ms" if ms < 10 else f"{ms:.0f}ms"


def versions_of(stats: dict[str, Any]) -> str:
    return "/".join(str(stats.get(f"{k}_version", "?")) for k in ("rpycsvc", "rpyc", "python"))


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> list[str]:
    """Align columns; ``right`` holds the indexes of right-aligned (numeric) columns.

    A row shorter than the headers (a DOWN row: address, state, reason) has its leading
    cells aligned with the others and its last cell run on, unaligned, to the end.
    """
    right = right or set()
    widths = [len(h) for h in headers]
    for row in rows:
        aligned = row if len(row) == len(headers) else row[:-1]
        for i, cell in enumerate(aligned):
            widths[i] = max(widths[i], len(cell))
    out = []
    for row in [headers, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        if len(row) < len(headers):
            cells[-1] = row[-1]
        out.append("  ".join(cells).rstrip())
    return out


def unique_addresses(addresses: list[str]) -> list[str]:
    """Each server once, in first-seen order, spelled as connections spell it
    (``host:port``, ``[v6]:port``): ``h``, ``h:18812`` and a repeated ``@hostsfile``
    entry are one server, probed once and shown on one row. An address that doesn't
    parse is kept as written, so its row says what is wrong with it."""
    from rpycsvc.client.connect import parse_address
    from rpycsvc.errors import ConfigError

    seen: dict[str, None] = {}
    for addr in addresses:
        if addr.startswith(("ssh://", "unix://")):  # an attach address (rpycsvc.client.attach)
            seen.setdefault(addr.strip(), None)
            continue
        try:
            host, port = parse_address(addr)
            key = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        except ConfigError:
            key = addr
        seen.setdefault(key, None)
    return list(seen)


STATUS_HEADERS = ["ADDRESS", "STATE", "RPYCSVC/RPYC/PY", "CORES", "WORKERS", "RUN", "QUEUED",
                  "DONE", "FAILED", "LOAD", "MEMORY", "UPTIME", "RTT"]


def format_table(statuses: list[ServerStatus]) -> str:
    """The ``status`` table; DOWN rows carry the reason instead of numbers."""
    rows = []
    for st in statuses:
        s = st.stats
        if not st.ok:
            rows.append([st.address, "DOWN", st.error or "unreachable"])
            continue
        load = s.get("load_average") or ()
        rows.append([
            st.address, "up", versions_of(s), str(s.get("cores", "?")),
            str(s.get("workers", "?")), str(s.get("tasks_running", "?")),
            str(s.get("tasks_queued", "?")), str(s.get("tasks_done", "?")),
            str(s.get("tasks_failed", "?")), f"{load[0]:.2f}" if load else "-",
            human_bytes(s.get("rss_total_bytes")), human_duration(s.get("uptime")),
            human_rtt(st.rtt),
        ])
    lines = table(STATUS_HEADERS, rows, right=set(range(3, 13)))
    down = sum(1 for st in statuses if not st.ok)
    summary = f"{len(statuses) - down} of {len(statuses)} servers up"
    return "\n".join([*lines, "", summary + (f", {down} DOWN" if down else "")]) + "\n"


# -- command -------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from rpycsvc.client.discovery import add_discover_arguments

    p.add_argument("hosts", nargs="*", metavar="HOST[:PORT]",
                   help="servers to ask (host, host:port or @hostsfile); a server named twice "
                   "is shown once")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list (address, ok, error, rtt_ms, stats) instead of the "
                   "table (default: off)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="seconds to wait for each server; probes run in parallel "
                   "(default: %(default)s)")
    p.add_argument("--authkey", default=None,
                   help="the servers' shared secret (default: RPYCSVC_AUTHKEY, or none; prefer "
                   "the variable: command lines are visible to other users)")
    add_discover_arguments(p)


def run(args: argparse.Namespace) -> int:
    """``rpycsvc status``: 0 if every server answered, 1 if any is DOWN."""
    from rpycsvc.client.discovery import addresses_from_args
    from rpycsvc.errors import ConfigError

    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be a positive number of seconds; got {args.timeout!r}")
    addresses = unique_addresses(addresses_from_args(args, args.timeout))
    statuses = probe_all(addresses, args.timeout, args.authkey)
    if args.json:
        text = json.dumps([st.as_json() for st in statuses], indent=2, default=str) + "\n"
    else:
        text = format_table(statuses)
    write_stdout(text)  # one write; a reader that stops early (| head) ends us quietly
    return 0 if all(st.ok for st in statuses) else 1
