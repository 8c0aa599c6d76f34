"""Prometheus metrics for one server: ``rpycsvc serve --metrics-port P``.

A small HTTP server on 127.0.0.1 (never another address: the page tells who runs what)
answers ``GET /metrics`` in Prometheus text format 0.0.4, built from the pool's counters
and the transport's byte counts at scrape time. No client library is needed for so few
series, and a scrape never blocks the server's RPyC connections.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from . import transport
from .errors import ConfigError

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("rpycsvc.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _fmt(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Writer:
    """Accumulates metric families: one ``# HELP``/``# TYPE`` header, then samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: list[tuple[dict[str, str], float]] | float) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        if not isinstance(samples, list):
            samples = [({}, samples)]
        for labels, value in samples:
            self.sample(name, labels, value)

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        lab = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{lab}}} {_fmt(value)}" if lab else f"{name} {_fmt(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(server: Server) -> str:
    """The whole ``/metrics`` page for ``server`` as it is now."""
    runtime, pool = server.runtime, server.pool
    stats = runtime.stats()
    # copies first: the pool updates these under its own lock while we format
    hist, duration_sum = pool.durations()
    buckets = sorted(hist.items())
    lanes = pool.lane_counts()  # lane traffic goes to the workers, not through this process
    traffic = {"in": transport.TRAFFIC["in"] + lanes["bytes_in"],
               "out": transport.TRAFFIC["out"] + lanes["bytes_out"]}
    w = _Writer()
    w.family("rpycsvc_info", "gauge", "Versions this server runs (always 1).",
             [({k[:-8]: str(v) for k, v in stats.items() if k.endswith("_version")}, 1)])
    w.family("rpycsvc_tasks_active", "gauge", "Tasks running or waiting on this server.",
             [({"state": "running"}, stats["tasks_running"]),
              ({"state": "queued"}, stats["tasks_queued"])])
    w.family("rpycsvc_tasks_finished_total", "counter",
             "Tasks finished since start: done (returned) or failed (raised, timed out, "
             "cancelled, or lost with their worker).",
             [({"state": "done"}, stats["tasks_done"]),
              ({"state": "failed"}, stats["tasks_failed"])])
    name = "rpycsvc_task_duration_seconds"
    w.family(name, "histogram", "Seconds from a task's start on a worker to its end.", [])
    count = 0
    for bound, n in buckets:
        count += n
        le = "+Inf" if bound == math.inf else repr(float(bound))
        w.sample(f"{name}_bucket", {"le": le}, count)
    if not buckets or buckets[-1][0] != math.inf:
        w.sample(f"{name}_bucket", {"le": "+Inf"}, count)
    w.sample(f"{name}_sum", {}, round(duration_sum, 6))
    w.sample(f"{name}_count", {}, count)
    w.family("rpycsvc_workers", "gauge", "Process workers this server runs tasks on.",
             stats["workers"])
    w.family("rpycsvc_worker_restarts_total", "counter",
             "Worker processes replaced after dying or being stopped to end a task.",
             stats["worker_restarts"])
    w.family("rpycsvc_connections_open", "gauge", "Client connections open now.",
             stats["connections"])
    w.family("rpycsvc_connections_total", "counter", "Client connections accepted since start.",
             stats["connections_total"])
    counters, inbound = server.counters, server.inbound
    w.family("rpycsvc_accept_errors_total", "counter",
             "Times accepting a connection failed (e.g. out of file descriptors); the server "
             "backs off and keeps accepting.", counters.accept_errors)
    w.family("rpycsvc_handshakes_failed_total", "counter",
             "Connections refused during their handshake (wrong key, TLS failure, silent for "
             "--handshake-timeout, malformed hello).", counters.handshakes_failed)
    w.family("rpycsvc_handshakes_evicted_total", "counter",
             "Pending handshakes dropped to make room for a newcomer while all --max-pending "
             "slots were taken.", counters.handshakes_evicted)
    w.family("rpycsvc_inbound_bytes_reserved", "gauge",
             "Bytes of incoming messages being received now (out of --inbound-budget).",
             inbound.used)
    w.family("rpycsvc_inbound_budget_bytes", "gauge", "The --inbound-budget setting.",
             inbound.total)
    w.family("rpycsvc_inbound_waits_total", "counter",
             "Times reading from an authenticated client waited for the inbound budget.",
             inbound.waits)
    w.family("rpycsvc_inbound_refused_total", "counter",
             "Unauthenticated connections refused because the inbound budget was in use.",
             inbound.refused)
    w.family("rpycsvc_received_bytes_total", "counter",
             "Bytes received on RPyC connections by this process.", traffic["in"])
    w.family("rpycsvc_sent_bytes_total", "counter",
             "Bytes sent on RPyC connections by this process.", traffic["out"])
    w.family("rpycsvc_memory_rss_bytes", "gauge",
             "Resident memory of the server and its worker processes.", stats["rss_total_bytes"])
    w.family("rpycsvc_start_time_seconds", "gauge", "When the server started (Unix time).",
             round(runtime.started, 3))
    w.family("rpycsvc_uptime_seconds", "gauge", "Seconds since the server started.",
             round(time.time() - runtime.started, 3))
    return w.text()


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsHTTPServer
    server_version = "rpycsvc-metrics"

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._reply(404, "text/plain; charset=utf-8", b"not found: try /metrics\n")
            return
        try:
            body = render_metrics(self.server.rpycsvc_server).encode()
        except Exception:
            log.exception("rendering metrics failed")
            self._reply(500, "text/plain; charset=utf-8", b"metrics failed; see the server log\n")
            return
        self._reply(200, CONTENT_TYPE, body)

    def _reply(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _MetricsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    rpycsvc_server: Server

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port (bounded by ``timeout`` seconds)."""
        done = threading.Thread(target=self.shutdown, daemon=True)
        done.start()
        done.join(timeout)
        self.server_close()


def serve_metrics(server: Server, port: int) -> ThreadingHTTPServer:
    """Serve ``server``'s metrics on ``http://127.0.0.1:port/metrics`` from a daemon thread.

    ``port`` 0 picks a free one (read ``httpd.server_address[1]``). Returns the HTTP server;
    ``httpd.close()`` (or ``shutdown()`` then ``server_close()``) stops it.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-port must be 0..65535; got {port!r}")
    try:
        httpd = _MetricsHTTPServer(("127.0.0.1", port), _Handler)
    except OSError as exc:
        raise ConfigError(
            f"can't serve metrics on 127.0.0.1:{port}: {exc.strerror or exc}") from exc
    httpd.rpycsvc_server = server
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.5},
                     name="rpycsvc-metrics", daemon=True).start()
    log.info("metrics on http://127.0.0.1:%d/metrics", httpd.server_address[1])
    return httpd
