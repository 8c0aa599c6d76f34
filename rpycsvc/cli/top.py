"""``rpycsvc top``: a live view of servers — throughput, tasks running now, recent failures.

A :class:`Monitor` keeps one connection per server and takes a :class:`Snapshot` of each
per refresh, in parallel and with a deadline, reconnecting servers that went away.
:func:`render` turns two rounds of snapshots into one screen; it is a pure function so
the view is tested without a terminal.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rpycsvc.cli.status import human_bytes, human_duration, table
from rpycsvc.client.output import write_stdout

DESCRIPTION = """\
A live view of rpycsvc servers, refreshed every --interval seconds (Ctrl-C quits):

  * per server: tasks finished per second (from the change since the last refresh),
    tasks running and queued, totals done/failed, workers, load, memory, uptime;
  * every task running now: server, task (function or endpoint), client, elapsed time;
  * the most recent failures: when, task, client and the error.

Servers that stop answering are shown DOWN and reconnected on later refreshes.
--once prints a single frame (after one interval, so throughput is real) and exits,
for scripts and logs. HOST is host, host:port or @hostsfile; --discover asks an RPyC
registry (see "rpycsvc registry")."""

#: Rows shown at most in each of the running and failures sections.
MAX_ROWS = 15
CLEAR = "\x1b[H\x1b[2J"


@dataclass
class Snapshot:
    """One server at one moment (``taken``: Unix time); ``error`` when it didn't answer."""

    address: str
    taken: float
    stats: dict[str, Any] = field(default_factory=dict)
    running: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[float, str, str, str]] = field(default_factory=list)
    error: str | None = None


def take_snapshot(client: Any) -> Snapshot:
    """Stats, running tasks and recent failures of the server behind ``client``."""
    from rpycsvc.protocol.serialization import loads

    taken = time.time()
    stats = client.stats()
    running = loads(client.conn.root.running(), "running tasks")
    try:
        failures = [tuple(f) for f in loads(client.conn.root.recent_failures(),
                                            "recent failures")]
    except AttributeError:  # a server from before recent_failures existed
        failures = []
    return Snapshot(client.address, taken, stats, list(running), failures)


# -- rendering (pure) ----------------------------------------------------------------------------
def throughput(snap: Snapshot, prev: Snapshot | None) -> float | None:
    """Tasks finished (done + failed) per second between two snapshots of one server;
    None without a usable earlier snapshot (first frame, server down or restarted)."""
    if prev is None or snap.error or prev.error or not snap.stats or not prev.stats:
        return None
    dt = snap.taken - prev.taken
    if dt <= 0 or snap.stats.get("pid") != prev.stats.get("pid"):
        return None

    def finished(s: Snapshot) -> int:
        return int(s.stats.get("tasks_done", 0)) + int(s.stats.get("tasks_failed", 0))

    delta = finished(snap) - finished(prev)
    return delta / dt if delta >= 0 else None


def render(snapshots: Mapping[str, Snapshot], previous: Mapping[str, Snapshot], now: float,
           width: int | None = None) -> str:
    """One screen of ``top`` from this refresh's ``snapshots`` and the one before.

    ``now`` (Unix time) dates the frame and ages the failures; ``width`` cuts long lines.
    """
    snaps = list(snapshots.values())
    up = [s for s in snaps if not s.error]
    total_rate = [r for r in (throughput(s, previous.get(a)) for a, s in snapshots.items())
                  if r is not None]
    head = (f"rpycsvc top  {time.strftime('%H:%M:%S', time.localtime(now))}  "
            f"{len(up)}/{len(snaps)} servers up  "
            f"{sum(len(s.running) for s in up)} running  "
            f"{sum(int(s.stats.get('tasks_queued', 0)) for s in up)} queued  "
            + (f"{sum(total_rate):.1f} tasks/s" if total_rate else "- tasks/s"))
    lines = [head, ""]
    rows = []
    for addr, s in snapshots.items():
        if s.error:
            rows.append([addr, "DOWN", s.error])
            continue
        st, rate = s.stats, throughput(s, previous.get(addr))
        load = st.get("load_average") or ()
        rows.append([addr, "-" if rate is None else f"{rate:.1f}",
                     str(st.get("tasks_running", 0)), str(st.get("tasks_queued", 0)),
                     str(st.get("tasks_done", 0)), str(st.get("tasks_failed", 0)),
                     str(st.get("workers", "?")), f"{load[0]:.2f}" if load else "-",
                     human_bytes(st.get("rss_total_bytes")), human_duration(st.get("uptime"))])
    lines += table(["SERVER", "TASKS/S", "RUN", "QUEUED", "DONE", "FAILED", "WORKERS", "LOAD",
                    "MEMORY", "UPTIME"], rows, right=set(range(1, 10)))

    running = sorted(((s.address, r) for s in up for r in s.running),
                     key=lambda ar: -float(ar[1].get("elapsed", 0)))
    lines += ["", f"RUNNING NOW ({len(running)})"]
    if running:
        rows = [[addr, str(r.get("task", "?")), str(r.get("client", "?")),
                 str(r.get("mode", "")), human_duration(r.get("elapsed"))]
                for addr, r in running[:MAX_ROWS]]
        lines += table(["SERVER", "TASK", "CLIENT", "MODE", "ELAPSED"], rows, right={4})
        if len(running) > MAX_ROWS:
            lines.append(f"... and {len(running) - MAX_ROWS} more")
    else:
        lines.append("(none)")

    failures = sorted(((s.address, f) for s in up for f in s.failures),
                      key=lambda af: -af[1][0])
    lines += ["", "RECENT FAILURES"]
    if failures:
        rows = [[human_duration(now - f[0]) + " ago", addr, f[1], f[2], _one_line(f[3])]
                for addr, f in failures[:MAX_ROWS]]
        lines += table(["WHEN", "SERVER", "TASK", "CLIENT", "ERROR"], rows, right={0})
    else:
        lines.append("(none)")
    if width:
        lines = [ln[:width] for ln in lines]
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first


# -- polling -------------------------------------------------------------------------------------
class Monitor:
    """One connection per server, polled in parallel; dead servers are retried each round."""

    def __init__(self, addresses: list[str], timeout: float = 5.0,
                 authkey: str | None = None) -> None:
        self.addresses = list(addresses)
        self.timeout = timeout
        self.authkey = authkey
        self._clients: dict[str, Any] = {}
        self._busy: dict[str, threading.Thread] = {}

    def _client(self, addr: str) -> Any:
        from rpycsvc.cli.status import _limit_calls
        from rpycsvc.client.connect import connect

        client = self._clients.get(addr)
        if client is None or client.closed:
            client = connect(addr, timeout=self.timeout, authkey=self.authkey, output="discard")
            _limit_calls(client, self.timeout)
            self._clients[addr] = client
        return client

    def poll(self) -> dict[str, Snapshot]:
        """A snapshot of every server, within ``2 * timeout`` seconds in all."""
        from rpycsvc.cli.status import _reason

        out: dict[str, Snapshot] = {}

        def one(addr: str) -> None:
            try:
                out[addr] = take_snapshot(self._client(addr))
            except Exception as exc:
                client = self._clients.pop(addr, None)
                if client is not None:
                    client.close(timeout=1.0)
                out[addr] = Snapshot(addr, time.time(), error=_reason(exc))

        for addr in self.addresses:
            if addr in self._busy and self._busy[addr].is_alive():
                continue  # last round's probe still hangs; don't pile up threads
            t = threading.Thread(target=one, args=(addr,), daemon=True, name=f"top-{addr}")
            self._busy[addr] = t
            t.start()
        deadline = time.monotonic() + 2 * self.timeout
        for t in list(self._busy.values()):
            t.join(max(0.0, deadline - time.monotonic()))
        return {a: out.get(a) or Snapshot(a, time.time(), error="no answer in time")
                for a in self.addresses}

    def close(self) -> None:
        for client in self._clients.values():
            client.close(timeout=1.0)
        self._clients.clear()


# -- command -------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from rpycsvc.client.discovery import add_discover_arguments

    p.add_argument("hosts", nargs="*", metavar="HOST[:PORT]",
                   help="servers to watch (host, host:port or @hostsfile); a server named "
                   "twice is shown once")
    p.add_argument("-n", "--interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes (default: %(default)s)")
    p.add_argument("--once", action="store_true",
                   help="print one frame (after one interval) and exit (default: off)")
    p.add_argument("--count", type=int, default=0, metavar="N",
                   help="stop after N frames; 0 runs until Ctrl-C (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="seconds to wait for a server each refresh (default: %(default)s)")
    p.add_argument("--authkey", default=None,
                   help="the servers' shared secret (default: RPYCSVC_AUTHKEY, or none; prefer "
                   "the variable: command lines are visible to other users)")
    add_discover_arguments(p)


def run(args: argparse.Namespace) -> int:
    """``rpycsvc top``: redraw until Ctrl-C (exit 0), or one frame with ``--once``."""
    from rpycsvc.client.discovery import addresses_from_args
    from rpycsvc.errors import ConfigError

    if args.interval <= 0 or args.timeout <= 0:
        raise ConfigError("--interval and --timeout must be positive numbers of seconds; got "
                          f"{args.interval!r} and {args.timeout!r}")
    from rpycsvc.cli.status import unique_addresses

    addresses = unique_addresses(addresses_from_args(args, args.timeout))
    monitor = Monitor(addresses, args.timeout, args.authkey)
    tty = sys.stdout.isatty()
    frames = 1 if args.once else args.count
    previous: dict[str, Snapshot] = {}
    try:
        if args.once:
            previous = monitor.poll()
            time.sleep(args.interval)
        for i in itertools.count(1):
            started = time.monotonic()
            snapshots = monitor.poll()
            width = shutil.get_terminal_size().columns if tty else None
            write_stdout((CLEAR if tty and not args.once else "")
                         + render(snapshots, previous, time.time(), width))
            previous = snapshots
            if frames and i >= frames:
                break
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    finally:
        monitor.close()
    if args.once:
        return 0 if all(not s.error for s in previous.values()) else 1
    return 0
