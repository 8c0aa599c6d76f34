"""The joblib backend (``rpycsvc.joblib``) on real local servers: scikit-learn's grid search
gives loky's answer, batches are sized by joblib's auto-batching, a failing task stops the
others on the servers, nested calls stay sequential in the worker, and a large array
repeated in every task crosses the network once per server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

import rpycsvc

joblib = pytest.importorskip("joblib")
np = pytest.importorskip("numpy")
pytest.importorskip("sklearn")

import rpycsvc.joblib  # noqa: E402  (registers the backend)
from tests.support.proxy import CuttableProxy  # noqa: E402
from tests.support.servers import REPO  # noqa: E402

SERVERS = 2


@pytest.fixture(scope="module")
def cluster() -> Iterator[rpycsvc.Cluster]:
    """Two local servers with one worker each (the machine has two cores)."""
    with rpycsvc.Cluster.local(SERVERS, workers=1, timeout=60) as c:
        yield c


def counters(cluster: rpycsvc.Cluster, key: str) -> dict[str, int]:
    stats = cluster.stats()
    assert all(isinstance(s, dict) for s in stats.values()), stats
    return {a: s[key] for a, s in stats.items()}  # type: ignore[index]


def wait_idle(cluster: rpycsvc.Cluster, timeout: float) -> dict[str, Any]:
    """Poll until no server runs or queues a task; returns the last stats either way."""
    deadline = time.monotonic() + timeout
    while True:
        stats = cluster.stats()
        busy = {a: (s["tasks_running"], s["tasks_queued"]) for a, s in stats.items()  # type: ignore[index]
                if s["tasks_running"] or s["tasks_queued"]}  # type: ignore[index]
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.1)


# -- tasks (module level: the servers import them from this module) --------------------------
def whoami() -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


def nested(i: int) -> tuple[tuple[int, int], str, list[tuple[int, int]]]:
    from joblib.parallel import get_active_backend

    backend, _ = get_active_backend()
    inner = joblib.Parallel(n_jobs=-1)(joblib.delayed(whoami)() for _ in range(4))
    return whoami(), type(backend).__name__, inner


def sleep_or_fail(i: int) -> int:
    if i == 1:
        time.sleep(0.5)
        raise ValueError("task 1 failed on purpose")
    time.sleep(110)  # far past the test's bound: only a cancel ends it in time
    return i


def checksum(a: Any, i: int) -> tuple[float, bool]:
    return float(a.sum()) + i, bool(a.flags.writeable)


# -- tests -----------------------------------------------------------------------------------
def test_grid_search_gives_lokys_answer_and_runs_on_the_servers(
        cluster: rpycsvc.Cluster) -> None:
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0], "kernel": ["linear", "rbf"], "gamma": ["scale", 0.1]}
    local = GridSearchCV(SVC(), grid, cv=3, n_jobs=2).fit(X, y)  # loky, joblib's default

    before = counters(cluster, "tasks_done")
    with joblib.parallel_config(backend="rpycsvc", cluster=cluster):
        assert joblib.effective_n_jobs(-1) == cluster.total_workers == SERVERS
        remote = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(X, y)
    after = counters(cluster, "tasks_done")

    assert remote.best_params_ == local.best_params_
    np.testing.assert_array_equal(remote.cv_results_["mean_test_score"],
                                  local.cv_results_["mean_test_score"])
    ran = {a: after[a] - before[a] for a in after}
    assert all(n > 0 for n in ran.values()), f"every server should have fitted some: {ran}"


def test_small_tasks_are_batched(cluster: rpycsvc.Cluster) -> None:
    before = counters(cluster, "tasks_done")
    with joblib.parallel_config(backend="rpycsvc", cluster=cluster):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(abs)(-i) for i in range(2000))
    after = counters(cluster, "tasks_done")
    assert out == list(range(2000))
    tasks = sum(after.values()) - sum(before.values())
    assert 0 < tasks < 400, f"2000 tiny calls took {tasks} server tasks: not batched"


def test_nested_parallel_runs_sequentially_in_the_worker(cluster: rpycsvc.Cluster) -> None:
    workers = {pid for s in cluster.stats().values() for pid in s["worker_pids"]}  # type: ignore[index]
    with joblib.parallel_config(backend="rpycsvc", cluster=cluster):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(nested)(i) for i in range(4))
    for me, backend, inner in out:
        assert backend == "SequentialBackend"
        assert me[0] in workers  # ran on a server's worker, not here
        assert inner == [me] * 4  # same process, same thread: no pool below


def test_large_array_crosses_once_per_server(cluster: rpycsvc.Cluster) -> None:
    shared_bytes, shared = run_via_proxies(cluster.addresses, ARRAY)
    inline_bytes, inline = run_via_proxies(cluster.addresses, ARRAY, share_threshold=None)
    assert [s for s, _ in shared] == [s for s, _ in inline] == EXPECTED
    assert inline_bytes > (TASKS - 1) * ARRAY.nbytes  # the proxy sees what travels
    assert shared_bytes < (SERVERS + 2) * ARRAY.nbytes, (
        f"{shared_bytes} bytes for {TASKS} tasks of a {ARRAY.nbytes}-byte array on "
        f"{SERVERS} servers")
    assert not any(w for _, w in shared)  # opened read-only, as loky's memory maps are
    # the servers (on this machine) removed the stored copies when the call ended
    deadline = time.monotonic() + 60  # (a busy machine: the removal is a task too)
    while stored_copies() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stored_copies() == []


def test_large_array_is_shared_where_thread_mode_is_off(server_process: Any) -> None:
    srv = server_process("--workers", "1", "--threads", "0")
    shared_bytes, shared = run_via_proxies([srv.address], ARRAY)
    assert [s for s, _ in shared] == EXPECTED
    assert shared_bytes < 3 * ARRAY.nbytes


def test_a_server_without_the_stored_array_gets_it_inline(cluster: rpycsvc.Cluster) -> None:
    failed = sum(counters(cluster, "tasks_failed").values())
    with joblib.parallel_config(backend="rpycsvc", cluster=cluster):
        out = joblib.Parallel(n_jobs=-1, batch_size=1)(
            joblib.delayed(checksum_after_dropping)(ARRAY, i) for i in range(TASKS))
    assert [s for s, _ in out] == EXPECTED
    # the batches that found no file failed there and were sent again with the array
    assert sum(counters(cluster, "tasks_failed").values()) > failed


ARRAY = np.random.default_rng(0).random((4 << 20) // 8)
TASKS = 16
EXPECTED = [float(ARRAY.sum()) + i for i in range(TASKS)]


def checksum_after_dropping(a: Any, i: int) -> tuple[float, bool]:
    """Task 0 removes every stored copy on this machine, as a restarted server lost them."""
    if i == 0:
        for name in stored_copies():
            shutil.rmtree(os.path.join(tempfile.gettempdir(), name), ignore_errors=True)
    return checksum(a, i)


def run_via_proxies(addresses: list[str], a: Any, **backend_kw: Any
                    ) -> tuple[int, list[tuple[float, bool]]]:
    """``checksum(a, i)`` for TASKS tasks through byte-counting proxies to ``addresses``:
    the bytes that crossed and the results."""
    proxies = [CountingProxy(*addr.rsplit(":", 1)) for addr in addresses]
    try:
        with rpycsvc.Cluster([p.address for p in proxies], timeout=30) as via, \
                joblib.parallel_config(backend="rpycsvc", cluster=via, **backend_kw):
            out = joblib.Parallel(n_jobs=-1, batch_size=1)(
                joblib.delayed(checksum)(a, i) for i in range(TASKS))
        return sum(p.bytes for p in proxies), out
    finally:
        for p in proxies:
            p.close()


def stored_copies() -> list[str]:
    return [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("rpycsvc-joblib-")]


def test_a_failing_task_stops_the_others_on_the_servers(cluster: rpycsvc.Cluster) -> None:
    assert wait_idle(cluster, 30) == {}
    failed_before = sum(counters(cluster, "tasks_failed").values())
    with joblib.parallel_config(backend="rpycsvc", cluster=cluster), \
            pytest.raises(ValueError, match="task 1 failed on purpose"):
        joblib.Parallel(n_jobs=-1, batch_size=1)(
            joblib.delayed(sleep_or_fail)(i) for i in range(6))
    busy = wait_idle(cluster, 60)
    assert busy == {}, f"tasks still running or queued on the servers after the abort: {busy}"
    assert sum(counters(cluster, "tasks_failed").values()) > failed_before


SCRIPT = """
import os, sys, joblib, rpycsvc.joblib
config = {"cluster": sys.argv[1:]} if sys.argv[1:] else {}
with joblib.parallel_config(backend="rpycsvc", **config):
    pids = joblib.Parallel(n_jobs=-1)(joblib.delayed(os.getpid)() for _ in range(8))
print(os.getpid(), *sorted(set(pids)))
"""


def run_script(*addresses: str) -> tuple[int, set[int]]:
    """SCRIPT in a fresh interpreter: its pid and the pids that ran its tasks, after
    checking it exited 0 and left no process behind (found by a marker in the env)."""
    token = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=str(REPO), RPYCSVC_JOBLIB_TEST=token)
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, *addresses], capture_output=True,
                              text=True, timeout=90, env=env, stdin=subprocess.DEVNULL)
    finally:
        deadline = time.monotonic() + 15
        while (left := marked(token)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in left:
            p.kill()
    assert proc.returncode == 0, proc.stderr
    assert not left, f"left running: {left}"
    me, *pids = map(int, proc.stdout.split())
    return me, set(pids)


def marked(token: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RPYCSVC_JOBLIB_TEST") == token:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def test_without_a_cluster_local_servers_are_started_and_stopped_at_exit() -> None:
    me, ran = run_script()
    assert ran and me not in ran


def test_addresses_are_connected_for_the_call(cluster: rpycsvc.Cluster) -> None:
    workers = {pid for s in cluster.stats().values() for pid in s["worker_pids"]}  # type: ignore[index]
    _, ran = run_script(*cluster.addresses)
    assert ran and ran <= workers


def test_bad_options_are_refused_by_name() -> None:
    with pytest.raises(rpycsvc.ConfigError, match="clustr"):
        joblib.parallel_config(backend="rpycsvc", clustr=["127.0.0.1:1"])
    with pytest.raises(rpycsvc.ConfigError, match="got 18812"):
        joblib.parallel_config(backend="rpycsvc", cluster=18812)
    with pytest.raises(rpycsvc.ConfigError, match="share_threshold"):
        joblib.parallel_config(backend="rpycsvc", share_threshold=-1)


class CountingProxy(CuttableProxy):
    """A proxy that counts the bytes it forwards both ways."""

    def __init__(self, host: str, port: str) -> None:
        self.bytes = 0
        self._count_lock = threading.Lock()
        super().__init__(host, int(port))

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:  # type: ignore[override]
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self._count_lock:
                    self.bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
