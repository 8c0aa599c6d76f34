"""Prometheus metrics for one server: ``rpycsvc serve --metrics-port P``.

The page is made by ``prometheus_client``, the library the Prometheus ecosystem uses: a
:class:`ServerCollector` reads the server's counters when a scrape asks (nothing is
counted per task for it), registered in a private ``CollectorRegistry`` per server (two
servers in one process never clash), and served by ``prometheus_client``'s WSGI app on
``http://127.0.0.1:P/metrics`` — never another address: the page tells who runs what.
It answers the text format 0.0.4, or OpenMetrics to a scraper that asks for it.

``prometheus_client`` is imported only when metrics are asked for (a server without
``--metrics-port``, and every deployed server, runs without it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from rpycsvc.errors import ConfigError
from rpycsvc.protocol import socket_stream

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from rpycsvc.server.server import Server

log = logging.getLogger("rpycsvc.metrics")

#: What ``/metrics`` answers a scraper that asks for no particular format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The oldest prometheus_client this module works with (as in pyproject.toml).
REQUIREMENT = "prometheus_client>=0.17"

#: Every family on the page: (name, type, help). Counters are named with their ``_total``.
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("rpycsvc_info", "gauge", "Versions this server runs (always 1)."),
    ("rpycsvc_tasks_active", "gauge", "Tasks running or waiting on this server."),
    ("rpycsvc_tasks_finished_total", "counter",
     "Tasks finished since start: done (returned) or failed (raised, timed out, "
     "cancelled, or lost with their worker)."),
    ("rpycsvc_task_duration_seconds", "histogram",
     "Seconds from a task's start on a worker to its end."),
    ("rpycsvc_workers", "gauge", "Process workers this server runs tasks on."),
    ("rpycsvc_worker_restarts_total", "counter",
     "Worker processes replaced after dying or being stopped to end a task."),
    ("rpycsvc_connections_open", "gauge", "Client connections open now."),
    ("rpycsvc_clients_not_reading", "gauge",
     "Connections whose queued tasks wait because their client leaves its results unread "
     "(over 256 MiB waiting to be sent)."),
    ("rpycsvc_connections_total", "counter", "Client connections accepted since start."),
    ("rpycsvc_accept_errors_total", "counter",
     "Times accepting a connection failed (e.g. out of file descriptors); the server "
     "backs off and keeps accepting."),
    ("rpycsvc_handshakes_failed_total", "counter",
     "Connections refused during their handshake (wrong key, TLS failure, silent for "
     "--handshake-timeout, malformed hello)."),
    ("rpycsvc_handshakes_evicted_total", "counter",
     "Pending handshakes dropped to make room for a newcomer while all --max-pending "
     "slots were taken."),
    ("rpycsvc_inbound_bytes_reserved", "gauge",
     "Bytes of incoming messages being received now (out of --inbound-budget)."),
    ("rpycsvc_inbound_budget_bytes", "gauge", "The --inbound-budget setting."),
    ("rpycsvc_inbound_waits_total", "counter",
     "Times reading from an authenticated client waited for the inbound budget."),
    ("rpycsvc_inbound_refused_total", "counter",
     "Unauthenticated connections refused because the inbound budget was in use."),
    ("rpycsvc_received_bytes_total", "counter",
     "Bytes received on RPyC connections by this process."),
    ("rpycsvc_sent_bytes_total", "counter", "Bytes sent on RPyC connections by this process."),
    ("rpycsvc_memory_rss_bytes", "gauge",
     "Resident memory of the server and its worker processes."),
    ("rpycsvc_start_time_seconds", "gauge", "When the server started (Unix time)."),
    ("rpycsvc_uptime_seconds", "gauge", "Seconds since the server started."),
)

#: One family's samples: (labels, value) pairs.
_Samples = list[tuple[dict[str, str], float]]


def require_prometheus_client() -> None:
    """Import ``prometheus_client`` or raise :class:`ConfigError` saying how to install it."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        import sys

        raise ConfigError(
            f"metrics (--metrics-port) are served by the prometheus_client package, which "
            f"this Python ({sys.executable}) can't import ({exc}); install it there: "
            f"pip install '{REQUIREMENT}' (it comes with rpycsvc, so reinstalling rpycsvc "
            f"with pip brings it too)") from exc


def _read(server: Server) -> tuple[dict[str, _Samples], list[tuple[str, float]], float]:
    """The server's numbers now: ({family: samples}, cumulative (le, count) buckets, sum)."""
    runtime, pool = server.runtime, server.pool
    stats = runtime.stats()
    # copies first: the pool updates these under its own lock while we read
    hist, duration_sum = pool.durations()
    from prometheus_client.utils import floatToGoString

    buckets: list[tuple[str, float]] = []
    count = 0
    for bound, n in sorted(hist.items()):
        count += n
        buckets.append((floatToGoString(bound), count))
    if not buckets or buckets[-1][0] != "+Inf":
        buckets.append(("+Inf", count))
    counters, inbound = server.counters, server.inbound
    started = runtime.started

    def one(value: float) -> _Samples:
        return [({}, value)]

    samples: dict[str, _Samples] = {
        "rpycsvc_info": [({k[:-8]: str(v) for k, v in stats.items()
                           if k.endswith("_version")}, 1)],
        "rpycsvc_tasks_active": [({"state": "running"}, stats["tasks_running"]),
                                 ({"state": "queued"}, stats["tasks_queued"])],
        "rpycsvc_tasks_finished_total": [({"state": "done"}, stats["tasks_done"]),
                                         ({"state": "failed"}, stats["tasks_failed"])],
        "rpycsvc_workers": one(stats["workers"]),
        "rpycsvc_worker_restarts_total": one(stats["worker_restarts"]),
        "rpycsvc_connections_open": one(stats["connections"]),
        "rpycsvc_clients_not_reading": one(stats.get("clients_not_reading", 0)),
        "rpycsvc_connections_total": one(stats["connections_total"]),
        "rpycsvc_accept_errors_total": one(counters.accept_errors),
        "rpycsvc_handshakes_failed_total": one(counters.handshakes_failed),
        "rpycsvc_handshakes_evicted_total": one(counters.handshakes_evicted),
        "rpycsvc_inbound_bytes_reserved": one(inbound.used),
        "rpycsvc_inbound_budget_bytes": one(inbound.total),
        "rpycsvc_inbound_waits_total": one(inbound.waits),
        "rpycsvc_inbound_refused_total": one(inbound.refused),
        "rpycsvc_received_bytes_total": one(socket_stream.TRAFFIC["in"]),
        "rpycsvc_sent_bytes_total": one(socket_stream.TRAFFIC["out"]),
        "rpycsvc_memory_rss_bytes": one(stats["rss_total_bytes"]),
        "rpycsvc_start_time_seconds": one(round(started, 3)),
        "rpycsvc_uptime_seconds": one(round(time.time() - started, 3)),
    }
    return samples, buckets, round(duration_sum, 6)


class ServerCollector:
    """A ``prometheus_client`` collector of one rpycsvc :class:`Server`'s metrics.

    It reads the server's counters at scrape time, so it costs nothing between scrapes.
    :func:`serve_metrics` registers one in a registry of its own; to put a server's
    metrics on a page you already serve, register one in your registry instead::

        registry.register(ServerCollector(server))
    """

    def __init__(self, server: Server) -> None:
        require_prometheus_client()
        self.server = server

    def describe(self) -> list[Metric]:
        """The families without samples (lets a registry check names without a scrape)."""
        return [self._family(name, kind, help_text, []) for name, kind, help_text in FAMILIES]

    def collect(self) -> Iterator[Metric]:
        """Every family with the server's numbers as they are now."""
        from prometheus_client.core import HistogramMetricFamily

        samples, buckets, duration_sum = _read(self.server)
        for name, kind, help_text in FAMILIES:
            if kind == "histogram":
                yield HistogramMetricFamily(name, help_text, buckets=buckets,
                                            sum_value=duration_sum)
            else:
                yield self._family(name, kind, help_text, samples[name])

    @staticmethod
    def _family(name: str, kind: str, help_text: str, samples: _Samples) -> Metric:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        if kind == "histogram":
            return HistogramMetricFamily(name, help_text)
        labels = list(samples[0][0]) if samples else []
        family: CounterMetricFamily | GaugeMetricFamily = (
            CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, help_text, labels=labels)
        for sample_labels, value in samples:
            family.add_metric([sample_labels[k] for k in labels], value)
        return family


class _Handler(WSGIRequestHandler):
    server_version = "rpycsvc-metrics"
    server: MetricsServer

    def setup(self) -> None:
        super().setup()
        # a connection that sends or takes nothing for this long is dropped (handle() gets
        # a timeout error) and its thread ends
        self.connection.settimeout(self.server.idle_timeout)

    def handle(self) -> None:
        try:
            super().handle()
        except OSError as exc:  # timed out, or the peer went away: nothing to answer
            log.debug("%s dropped: %s", self.client_address[0], exc)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer(ThreadingMixIn, WSGIServer):
    """The HTTP server of :func:`serve_metrics`; ``close()`` stops it.

    Anyone on the host can connect (the page has no key), and each connection gets a
    thread of the rpycsvc server's process: a connection idle for ``idle_timeout`` seconds
    is dropped, and beyond ``max_connections`` at once a new one is closed unanswered, so
    idle connections can't pile up threads (a scraper makes one short request at a time).
    """

    daemon_threads = True
    #: seconds a connection may send or take nothing before it is dropped
    idle_timeout: float = 10.0
    #: connections served at once; more are closed as soon as they are accepted
    max_connections: int = 16
    #: the private registry the page is made from (holds one :class:`ServerCollector`)
    registry: CollectorRegistry

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection if a slot is free; else close it at once."""
        if not self._slots.acquire(blocking=False):
            log.debug("%s refused: %d metrics connections open already",
                      client_address[0], self.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: it won't give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port (bounded by ``timeout`` seconds)."""
        done = threading.Thread(target=self.shutdown, daemon=True)
        done.start()
        done.join(timeout)
        self.server_close()


def _app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """``prometheus_client``'s WSGI app on ``/metrics`` only; other paths answer 404."""
    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: try /metrics\n"]
        try:
            return metrics_app(environ, start_response)
        except Exception:
            log.exception("collecting metrics failed")
            start_response("500 Internal Server Error",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [b"metrics failed; see the server log\n"]

    return app


def serve_metrics(server: Server, port: int) -> MetricsServer:
    """Serve ``server``'s metrics on ``http://127.0.0.1:port/metrics`` from a daemon thread.

    ``port`` 0 picks a free one (read ``httpd.server_address[1]``). Returns the HTTP server;
    ``httpd.close()`` stops it. Raises :class:`ConfigError` for a bad or busy port, or when
    ``prometheus_client`` is not installed.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-port must be 0..65535; got {port!r}")
    require_prometheus_client()
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    try:
        httpd = MetricsServer(("127.0.0.1", port), _Handler)
    except OSError as exc:
        raise ConfigError(
            f"can't serve metrics on 127.0.0.1:{port}: {exc.strerror or exc}") from exc
    httpd.registry = registry
    httpd.set_app(_app(registry))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.5},
                     name="rpycsvc-metrics", daemon=True).start()
    log.info("metrics on http://127.0.0.1:%d/metrics", httpd.server_address[1])
    return httpd


__all__ = ["CONTENT_TYPE", "FAMILIES", "MetricsServer", "ServerCollector", "serve_metrics"]
