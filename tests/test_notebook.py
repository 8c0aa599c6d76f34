"""rpycsvc in a real Jupyter kernel: ``jupyter_client`` starts an ``ipykernel``, runs cells,
and the tests read each cell's outputs on the iopub channel (as a notebook frontend does).

What a notebook user sees: a task's prints land in the cell that submitted it (also when
they come while another cell runs); ``%%remote`` streams the cell's output; the kernel's
interrupt stops a ``%%remote`` cell blocked in ``time.sleep`` and the kernel goes on;
``map(progress=True)`` draws a widget; the cluster and futures show HTML cards.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.support.servers import REPO, running_server

pytest.importorskip("ipykernel")
jupyter_client = pytest.importorskip("jupyter_client")

#: Bound of every wait for the kernel (a loaded machine starts kernels slowly).
BOUND = 60.0
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def servers() -> Iterator[list[str]]:
    with running_server(workers=1) as a, running_server(workers=1) as b:
        yield [a.address, b.address]


class Kernel:
    """A kernel and its client; every iopub message is kept, by the cell it belongs to."""

    def __init__(self, km: Any, kc: Any) -> None:
        self.km, self.kc = km, kc
        self.by_cell: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def _read(self, timeout: float) -> dict[str, Any] | None:
        import queue

        try:
            msg: dict[str, Any] = self.kc.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return None
        self.by_cell[msg["parent_header"].get("msg_id", "")].append(msg)
        return msg

    def wait_for(self, what: str, done: Callable[[], bool], bound: float = BOUND) -> None:
        deadline = time.monotonic() + bound
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, f"no {what} within {bound:g} s; outputs: {dict(self.by_cell)}"
            self._read(min(left, 1.0))

    def start(self, code: str, allow_stdin: bool = False) -> str:
        """Send a cell; its msg_id (the cell's id in every output that belongs to it)."""
        msg_id: str = self.kc.execute(code, allow_stdin=allow_stdin)
        return msg_id

    def finish(self, msg_id: str, bound: float = BOUND) -> dict[str, Any]:
        """Wait for the cell to end (its reply and its 'idle'); the reply's content."""
        import queue

        deadline = time.monotonic() + bound
        reply = None
        while reply is None:
            left = deadline - time.monotonic()
            assert left > 0, f"cell {msg_id} did not finish within {bound:g} s"
            try:
                msg = self.kc.get_shell_msg(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                reply = msg["content"]
        self.wait_for("idle", lambda: any(
            m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
            for m in self.by_cell[msg_id]), bound=max(1.0, deadline - time.monotonic()))
        return reply

    def run(self, code: str, ok: bool = True) -> str:
        msg_id = self.start(code)
        reply = self.finish(msg_id)
        if ok:
            assert reply["status"] == "ok", (reply, self.text(msg_id, "stderr"))
        return msg_id

    def text(self, msg_id: str, name: str = "stdout") -> str:
        return "".join(m["content"]["text"] for m in self.by_cell[msg_id]
                       if m["msg_type"] == "stream" and m["content"]["name"] == name)

    def data(self, msg_id: str) -> list[dict[str, Any]]:
        """The mime bundles the cell displayed (display_data and its result)."""
        return [m["content"]["data"] for m in self.by_cell[msg_id]
                if m["msg_type"] in ("display_data", "execute_result")]

    def cell_of(self, needle: str) -> list[str]:
        """The cells whose stdout has ``needle``."""
        return [cell for cell in list(self.by_cell) if needle in self.text(cell)]


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    """An ipykernel of this Python, with its own kernelspec, connection file and IPython
    directory under tmp_path; shut down in finally.

    Its channels are Unix sockets (``ipc``), not TCP ports: ports picked free by the
    manager can be taken by another process before the kernel binds them. A socket's path
    must be short (about 100 bytes), so they live in a short directory of their own."""
    import shutil
    import tempfile

    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    specs = tmp_path / "kernels" / "rpycsvc-test"
    specs.mkdir(parents=True)
    (specs / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 "--HistoryManager.enabled=False"],
        "display_name": "rpycsvc test", "language": "python"}))
    (tmp_path / "runtime").mkdir()
    sockets = tempfile.mkdtemp(prefix="rk-")
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    km = KernelManager(kernel_name="rpycsvc-test", kernel_spec_manager=ksm,
                       connection_file=str(tmp_path / "runtime" / "kernel.json"),
                       transport="ipc", ip=os.path.join(sockets, "k"))
    env = dict(os.environ, PYTHONPATH=str(REPO), IPYTHONDIR=str(tmp_path / "ipython"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    kc = None
    try:
        km.start_kernel(env=env, cwd=str(tmp_path))
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=BOUND)
        yield Kernel(km, kc)
    finally:
        if kc is not None:
            kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        shutil.rmtree(sockets, ignore_errors=True)


def test_a_tasks_prints_land_in_the_cell_that_submitted_it(kernel: Kernel, servers: list[str],
                                                           tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    kernel.run(f"import rpycsvc\ncluster = rpycsvc.Cluster({servers[:1]!r})")
    submitted = kernel.run(
        "def later(path):\n"
        "    import os, time\n"
        "    deadline = time.monotonic() + 60\n"
        "    while not os.path.exists(path) and time.monotonic() < deadline:\n"
        "        time.sleep(0.05)\n"
        "    print('late-marker', flush=True)\n"
        "    return 7\n"
        f"fut = cluster.submit(later, {str(gate)!r})\n")
    # The print comes while this other cell runs: it still belongs to the one above.
    other = kernel.run(f"open({str(gate)!r}, 'w').close()\nfut.result(60)")
    kernel.wait_for("the task's print", lambda: bool(kernel.cell_of("late-marker")))
    assert kernel.cell_of("late-marker") == [submitted], (submitted, other)
    assert "late-marker" in kernel.text(submitted)


def test_a_map_in_a_cell_prints_there_and_draws_a_progress_widget(kernel: Kernel,
                                                                  servers: list[str]) -> None:
    kernel.run(f"import rpycsvc\ncluster = rpycsvc.Cluster({servers!r})")
    cell = kernel.run("def shout(x):\n    print('item', x)\n    return x * x\n"
                      "total = sum(cluster.map(shout, range(20), progress=True))\n"
                      "print('total', total)")
    assert "total 2470" in kernel.text(cell)
    for x in range(20):
        assert f"] item {x}\n" in kernel.text(cell)
    assert any(WIDGET in d for d in kernel.data(cell)), kernel.data(cell)
    assert "done in" not in kernel.text(cell, "stderr")  # the widget, not the log line


def test_without_widgets_a_map_reports_one_summary_line(kernel: Kernel,
                                                      servers: list[str]) -> None:
    kernel.run("import sys\nsys.modules['ipywidgets'] = None  # as if not installed\n"
               f"import rpycsvc\ncluster = rpycsvc.Cluster({servers!r})")
    cell = kernel.run("total = sum(cluster.map(abs, range(-10, 0), progress=True))\n"
                      "print('total', total)")
    assert "total 55" in kernel.text(cell)
    assert not any(WIDGET in d for d in kernel.data(cell))
    assert re.search(r"^10/10 done in [\d.]+s", kernel.text(cell, "stderr"), re.M), \
        kernel.text(cell, "stderr")


def test_html_cards_of_cluster_client_and_future(kernel: Kernel, servers: list[str]) -> None:
    kernel.run(f"import rpycsvc\ncluster = rpycsvc.Cluster({servers!r})\n"
               "fut = cluster.submit(pow, 2, 10)\nfut.result(60)")
    card = kernel.data(kernel.run("cluster"))
    html = card[-1]["text/html"]
    assert "rpycsvc.Cluster" in html and "2 of 2 servers up" in html
    for address in servers:
        assert address in html
    done = re.search(r"(\d+) done", html)
    assert done is not None and int(done.group(1)) >= 1, html  # pow ran there (at least)
    fut_html = kernel.data(kernel.run("fut"))[-1]["text/html"]
    assert "finished" in fut_html and "1024" in fut_html
    client_html = kernel.data(kernel.run("cluster[0]"))[-1]["text/html"]
    assert "rpycsvc.Client" in client_html and servers[0] in client_html


def test_remote_magic_streams_output_and_the_kernel_interrupt_stops_it(
        kernel: Kernel, servers: list[str]) -> None:
    kernel.run("%load_ext rpycsvc.integrations.ipython")
    kernel.run(f"%rpycsvc connect {servers[0]}")
    cell = kernel.run("%%remote\nimport os\nanswer = 6 * 7\nprint('remote-hello', os.getpid())")
    assert "remote-hello" in kernel.text(cell)
    assert f"remote-hello {os.getpid()}" not in kernel.text(cell)

    sleeper = kernel.start("%%remote\nimport time\nprint('sleeping', flush=True)\n"
                           "time.sleep(60)\nprint('not reached')")
    kernel.wait_for("'sleeping'", lambda: "sleeping" in kernel.text(sleeper))
    started = time.monotonic()
    kernel.km.interrupt_kernel()
    reply = kernel.finish(sleeper, bound=45.0)  # well before the sleep's 60 s
    assert time.monotonic() - started < 45.0
    assert reply["status"] == "error"
    assert "KeyboardInterrupt" in kernel.text(sleeper, "stderr")  # the server's traceback
    assert "not reached" not in kernel.text(sleeper)

    # the kernel and the session go on: the session kept its variables
    after = kernel.run("%%remote\nprint('after', answer)")
    assert "after 42" in kernel.text(after)
    assert "local 2" in kernel.text(kernel.run("print('local', 1 + 1)"))


def test_broadcast_magic_runs_on_every_server_and_names_them(kernel: Kernel,
                                                             servers: list[str]) -> None:
    kernel.run("%load_ext rpycsvc")
    kernel.run(f"%rpycsvc connect {' '.join(servers)} --name pool")
    cell = kernel.run("%%broadcast\nimport os\nprint('hello from', os.getpid())")
    out = kernel.text(cell)
    for address in servers:
        assert f"[{address}] hello from" in out, out
    shown = kernel.data(kernel.run("%rpycsvc"))
    assert "2 of 2 servers up" in shown[-1]["text/html"]
    assert "Cluster" in kernel.text(kernel.run("print(type(pool).__name__)"))


def test_input_in_a_remote_cell_asks_the_notebook(kernel: Kernel, servers: list[str]) -> None:
    import queue

    kernel.run("%load_ext rpycsvc")
    kernel.run(f"%rpycsvc connect {servers[0]}")
    cell = kernel.start("%%remote\nname = input('your name? ')\nprint('hello', name)",
                        allow_stdin=True)
    deadline = time.monotonic() + BOUND
    while True:  # the notebook's input box: an input_request on the stdin channel
        assert time.monotonic() < deadline, "no input_request"
        try:
            msg = kernel.kc.get_stdin_msg(timeout=1.0)
        except queue.Empty:
            continue
        if msg["msg_type"] == "input_request":
            break
    assert msg["content"]["prompt"] == "your name? "
    kernel.kc.input("Ada")
    assert kernel.finish(cell)["status"] == "ok"
    assert "hello Ada" in kernel.text(cell)
