"""Prometheus metrics scraped over HTTP from 127.0.0.1 and parsed: every family has HELP
and TYPE, the duration histogram is cumulative, and running a task moves the counters."""

from __future__ import annotations

import inspect
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

import rpycsvc
from rpycsvc import cli
from rpycsvc.metrics import CONTENT_TYPE, serve_metrics
from rpycsvc.pool import DURATION_BUCKETS
from rpycsvc.registry import free_port
from tests.support.servers import ServerProcess

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Prometheus text format 0.0.4 → ({(name, labels): value}, {family: type})."""
    samples: Samples = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.groups()
            key = (name, frozenset(LABEL.findall(labels or "")))
            assert key not in samples, f"duplicate sample {line!r}"
            samples[key] = math.inf if value == "+Inf" else float(value)
    assert helps == set(types), "every family needs both # HELP and # TYPE"
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def metrics(server: rpycsvc.Server) -> Iterator[ThreadingHTTPServer]:
    httpd = serve_metrics(server, 0)
    try:
        yield httpd
    finally:
        httpd.close()  # type: ignore[attr-defined]


def scrape(httpd: ThreadingHTTPServer, path: str = "/metrics") -> tuple[str, str]:
    url = f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode(), resp.headers["Content-Type"]


def test_scrape_parses_and_a_task_moves_the_counters(metrics: ThreadingHTTPServer,
                                                     client: rpycsvc.Client) -> None:
    assert metrics.server_address[0] == "127.0.0.1"
    text, ctype = scrape(metrics)
    assert ctype == CONTENT_TYPE
    before, types = parse(text)
    assert types["rpycsvc_tasks_finished_total"] == "counter"
    assert types["rpycsvc_task_duration_seconds"] == "histogram"
    assert types["rpycsvc_tasks_active"] == "gauge"
    assert value(before, "rpycsvc_connections_open") >= 1  # our client
    assert value(before, "rpycsvc_uptime_seconds") > 0

    assert client.compute(sum, range(10)) == 45
    with pytest.raises(ZeroDivisionError):
        client.compute(divmod, 1, 0)
    after, _ = parse(scrape(metrics)[0])

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("rpycsvc_tasks_finished_total", state="done") == 1
    assert delta("rpycsvc_tasks_finished_total", state="failed") == 1
    assert delta("rpycsvc_task_duration_seconds_count") == 2
    assert delta("rpycsvc_task_duration_seconds_sum") > 0
    assert delta("rpycsvc_task_duration_seconds_bucket", le="+Inf") == 2
    assert delta("rpycsvc_received_bytes_total") > 0
    assert delta("rpycsvc_sent_bytes_total") > 0
    assert value(after, "rpycsvc_tasks_active", state="running") == 0
    assert value(after, "rpycsvc_workers") == 2


def test_histogram_is_cumulative(metrics: ThreadingHTTPServer, client: rpycsvc.Client) -> None:
    client.compute(abs, -1)
    samples, _ = parse(scrape(metrics)[0])
    buckets = sorted((float(dict(lab)["le"]) if dict(lab)["le"] != "+Inf" else math.inf, v)
                     for (name, lab), v in samples.items()
                     if name == "rpycsvc_task_duration_seconds_bucket")
    assert [b for b, _ in buckets] == sorted(DURATION_BUCKETS)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "bucket counts must be cumulative"
    assert counts[-1] == value(samples, "rpycsvc_task_duration_seconds_count") >= 1


def test_versions_and_other_paths(metrics: ThreadingHTTPServer) -> None:
    samples, _ = parse(scrape(metrics)[0])
    info = next(dict(lab) for (name, lab) in samples if name == "rpycsvc_info")
    assert info["rpycsvc"] == rpycsvc.__version__ and info["rpyc"].startswith("6.")
    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(metrics, "/")
    assert err.value.code == 404


def test_port_in_use_is_a_config_error(server: rpycsvc.Server,
                                       metrics: ThreadingHTTPServer) -> None:
    with pytest.raises(rpycsvc.ConfigError, match="can't serve metrics on 127"):
        serve_metrics(server, metrics.server_address[1])


@pytest.mark.skipif("serve_metrics" not in inspect.getsource(cli.run),
                    reason="rpycsvc/cli.py run() does not start serve_metrics() yet")
def test_serve_metrics_port_option(server_process: type[ServerProcess]) -> None:
    port = free_port()
    proc = server_process("--workers", "1", "--metrics-port", str(port))
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 30
    while True:  # bounded: the listener may start just after the address line
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
            break
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    samples, _ = parse(text)
    assert value(samples, "rpycsvc_workers") == 1
    assert proc.stop() == 0
