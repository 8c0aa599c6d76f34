"""Prometheus metrics scraped over HTTP from 127.0.0.1 and parsed: every family has HELP
and TYPE, the duration histogram is cumulative, and running a task moves the counters."""

from __future__ import annotations

import inspect
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

import rpycsvc
from rpycsvc.cli import main as cli
from rpycsvc.server.metrics import CONTENT_TYPE, FAMILIES, MetricsServer, serve_metrics
from rpycsvc.server.pool import DURATION_BUCKETS
from rpycsvc.server.registry import free_port
from tests.support.servers import REPO, ServerProcess, running_server

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
def metrics(server: rpycsvc.Server) -> Iterator[MetricsServer]:
    httpd = serve_metrics(server, 0)
    try:
        yield httpd
    finally:
        httpd.close()


def scrape(httpd: MetricsServer, path: str = "/metrics",
           headers: dict[str, str] | None = None) -> tuple[str, str]:
    url = f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode(), resp.headers["Content-Type"]


def test_scrape_parses_and_a_task_moves_the_counters(metrics: MetricsServer,
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


def test_histogram_is_cumulative(metrics: MetricsServer, client: rpycsvc.Client) -> None:
    client.compute(abs, -1)
    samples, _ = parse(scrape(metrics)[0])
    buckets = sorted((float(dict(lab)["le"]) if dict(lab)["le"] != "+Inf" else math.inf, v)
                     for (name, lab), v in samples.items()
                     if name == "rpycsvc_task_duration_seconds_bucket")
    assert [b for b, _ in buckets] == sorted(DURATION_BUCKETS)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "bucket counts must be cumulative"
    assert counts[-1] == value(samples, "rpycsvc_task_duration_seconds_count") >= 1


def test_versions_and_other_paths(metrics: MetricsServer) -> None:
    samples, _ = parse(scrape(metrics)[0])
    info = next(dict(lab) for (name, lab) in samples if name == "rpycsvc_info")
    assert info["rpycsvc"] == rpycsvc.__version__ and info["rpyc"].startswith("6.")
    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(metrics, "/")
    assert err.value.code == 404


def test_port_in_use_is_a_config_error(server: rpycsvc.Server,
                                       metrics: MetricsServer) -> None:
    with pytest.raises(rpycsvc.ConfigError, match="can't serve metrics on 127"):
        serve_metrics(server, metrics.server_address[1])


@pytest.mark.skipif("serve_metrics" not in inspect.getsource(cli.run),
                    reason="rpycsvc/cli/main.py run() does not start serve_metrics() yet")
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


# -- served by prometheus_client (issue 18) --------------------------------------------------


def families(text: str) -> dict[str, Metric]:
    """The page parsed by prometheus_client's own parser: {family name: family}."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, Metric], family: str, name: str, **labels: str) -> float:
    found = [s.value for s in fams[family].samples if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {found} in {fams[family].samples}"
    return float(found[0])


def test_prometheus_client_parses_the_page_after_real_tasks(metrics: MetricsServer,
                                                            client: rpycsvc.Client) -> None:
    before = families(scrape(metrics)[0])
    assert client.compute(sum, range(10)) == 45
    with pytest.raises(ZeroDivisionError):
        client.compute(divmod, 1, 0)
    assert client.compute(pow, 2, 10) == 1024
    after = families(scrape(metrics)[0])

    # every family of the table in docs/operations.md, with its type (counters lose "_total"
    # in the parser)
    expected = {(n[:-6] if k == "counter" else n): k for n, k, _ in FAMILIES}
    assert {name: f.type for name, f in after.items()} == expected
    assert all(f.documentation for f in after.values())

    def delta(family: str, name: str, **labels: str) -> float:
        return sample(after, family, name, **labels) - sample(before, family, name, **labels)

    finished = "rpycsvc_tasks_finished"
    assert delta(finished, f"{finished}_total", state="done") == 2
    assert delta(finished, f"{finished}_total", state="failed") == 1
    hist = "rpycsvc_task_duration_seconds"
    assert delta(hist, f"{hist}_count") == 3
    assert delta(hist, f"{hist}_bucket", le="+Inf") == 3
    assert delta(hist, f"{hist}_sum") > 0
    assert [s.labels["le"] for s in after[hist].samples if s.name == f"{hist}_bucket"] == \
        ["+Inf" if b == math.inf else str(float(b)) for b in sorted(DURATION_BUCKETS)]
    assert delta("rpycsvc_received_bytes", "rpycsvc_received_bytes_total") > 0
    assert delta("rpycsvc_sent_bytes", "rpycsvc_sent_bytes_total") > 0
    assert sample(after, "rpycsvc_workers", "rpycsvc_workers") == 2
    assert sample(after, "rpycsvc_tasks_active", "rpycsvc_tasks_active", state="running") == 0
    assert sample(after, "rpycsvc_connections_open", "rpycsvc_connections_open") >= 1
    assert sample(after, "rpycsvc_memory_rss_bytes", "rpycsvc_memory_rss_bytes") > 0
    info = after["rpycsvc_info"].samples[0]
    assert info.value == 1 and info.labels["rpycsvc"] == rpycsvc.__version__
    assert info.labels["python"] == platform.python_version()


def test_openmetrics_for_a_scraper_that_asks(metrics: MetricsServer,
                                             client: rpycsvc.Client) -> None:
    """Content negotiation comes with prometheus_client: Prometheus asks for OpenMetrics."""
    client.compute(abs, -3)
    text, ctype = scrape(metrics, headers={"Accept": "application/openmetrics-text"})
    assert ctype.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    fams = {f.name: f for f in openmetrics_families(text)}
    done = fams["rpycsvc_tasks_finished"]
    assert done.type == "counter"
    assert any(s.name == "rpycsvc_tasks_finished_total" and s.labels == {"state": "done"}
               and s.value >= 1 for s in done.samples)
    assert fams["rpycsvc_task_duration_seconds"].type == "histogram"


def test_two_servers_in_one_process_have_their_own_pages() -> None:
    """Each page is made from its own registry: no clash, no numbers of the other server."""
    with running_server(workers=1) as one, running_server(workers=2) as two:
        pages = [serve_metrics(one, 0), serve_metrics(two, 0)]
        try:
            with rpycsvc.connect(one.address, output="discard") as c:
                for i in range(3):
                    assert c.compute(abs, -i) == i
            first, second = (families(scrape(p)[0]) for p in pages)
        finally:
            for p in pages:
                p.close()
    name = "rpycsvc_tasks_finished_total"
    assert sample(first, "rpycsvc_workers", "rpycsvc_workers") == 1
    assert sample(second, "rpycsvc_workers", "rpycsvc_workers") == 2
    assert sample(first, "rpycsvc_tasks_finished", name, state="done") == 3
    assert sample(second, "rpycsvc_tasks_finished", name, state="done") == 0


#: Runs in a child whose Python can't import prometheus_client (as if it were not installed).
WITHOUT_PROMETHEUS = """
import sys
sys.modules["prometheus_client"] = None  # "import prometheus_client" now raises ImportError
import rpycsvc
from rpycsvc.cli import main as cli

# a server without --metrics-port does not need it
with rpycsvc.Server(rpycsvc.ServerConfig(port=0, workers=1)) as srv:
    with rpycsvc.connect(srv.address, output="discard") as c:
        print("task:", c.compute(sum, [1, 2, 3]), flush=True)
# --metrics-port refuses to start, saying what to install
sys.exit(cli.main(["serve", "--port", "0", "--workers", "1", "--metrics-port", "0"]))
"""


def test_without_prometheus_client_metrics_name_the_fix() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_PROMETHEUS], capture_output=True,
                          text=True, timeout=90, env=env, cwd=str(REPO),
                          stdin=subprocess.DEVNULL)
    assert "task: 6" in proc.stdout, proc.stderr
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "rpycsvc serve: error: " in proc.stderr
    assert "prometheus_client" in proc.stderr and "pip install" in proc.stderr
    assert "Traceback" not in proc.stderr


def _wait_page(port: int, timeout: float = 30.0) -> str:
    """The metrics page, polled until it answers (bounded)."""
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return str(resp.read().decode())
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
@pytest.mark.timeout(180)
def test_idle_metrics_connections_do_not_pin_server_threads(
        server_process: type[ServerProcess]) -> None:
    """Anyone on the host can open connections to the page: idle ones are dropped after
    MetricsServer.idle_timeout, and beyond max_connections at once closed unanswered, so
    the server's thread count returns to what it was and the page still answers."""
    port = free_port()
    proc = server_process("--workers", "1", "--metrics-port", str(port))
    task_dir = f"/proc/{proc.pid}/task"

    def threads() -> int:
        return len(os.listdir(task_dir))

    _wait_page(port)
    before = threads()
    conns: list[socket.socket] = []
    try:
        for _ in range(3 * MetricsServer.max_connections):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        most = threads()
        deadline = time.monotonic() + 6 * MetricsServer.idle_timeout
        while threads() > before and time.monotonic() < deadline:
            most = max(most, threads())
            time.sleep(0.1)
        assert threads() <= before, "idle metrics connections still hold server threads"
        # a thread per connection up to the cap, never one per connection (small slack for
        # the server's own short-lived threads)
        assert most <= before + MetricsServer.max_connections + 4, most
    finally:
        for c in conns:
            c.close()
    samples, _ = parse(_wait_page(port))
    assert value(samples, "rpycsvc_workers") == 1
    assert proc.stop() == 0
