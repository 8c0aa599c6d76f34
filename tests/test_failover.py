"""A server dying, a link cut, every server gone, timeouts and cancel — nothing lost or hung."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

import rpycsvc
from rpycsvc import Cluster
from tests.support.proxy import CuttableProxy


def _work(x: int) -> int:
    time.sleep(0.004)
    return x * 3


def test_kill9_one_server_mid_map_yields_every_result_once_in_order(server_process) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "2")
    b = server_process("--workers", "2")
    with Cluster([a.address, b.address], output="discard", reconnect=False) as c:
        results = []
        for i, r in enumerate(c.map(_work, range(1000), chunksize=5)):
            results.append(r)
            if i == 150:
                b.kill()
        assert results == [x * 3 for x in range(1000)]
        assert not c[a.address].closed
        with pytest.raises(rpycsvc.ServerLostError):
            c[b.address]


def test_cut_link_mid_map_reruns_elsewhere_and_reconnects(server_process) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "1")
    b = server_process("--workers", "1")
    proxy = CuttableProxy("127.0.0.1", b.port)
    try:
        with Cluster([a.address, proxy.address], output="discard") as c:
            results = []
            for i, r in enumerate(c.map(_work, range(300), chunksize=2)):
                results.append(r)
                if i == 40:
                    proxy.cut()
            assert results == [x * 3 for x in range(300)]
            # the cluster reconnects through the proxy by itself (bounded wait)
            deadline = time.monotonic() + 20
            while len(c.clients) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(c.clients) == 2
            assert c[proxy.address].compute(os.getppid) == b.pid
    finally:
        proxy.close()


def test_all_servers_dead_fails_fast_naming_each(server_process) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "1")
    b = server_process("--workers", "1")
    with Cluster([a.address, b.address], output="discard", reconnect=False) as c:
        slow = [c.submit(time.sleep, 30) for _ in range(6)]
        a.kill()
        b.kill()
        for f in slow:
            with pytest.raises((rpycsvc.AllServersFailedError, rpycsvc.ServerLostError)) as info:
                f.result(timeout=20)
        assert a.address in str(info.value) or b.address in str(info.value)
        t0 = time.monotonic()
        with pytest.raises(rpycsvc.AllServersFailedError) as info2:
            c.submit(abs, 1).result(timeout=20)
        assert a.address in str(info2.value) and b.address in str(info2.value)
        assert time.monotonic() - t0 < 15  # failed at once rather than hanging to the timeout


def test_retries_zero_reports_instead_of_rerunning(server_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "1")
    b = server_process("--workers", "1")
    marker = tmp_path / "started"
    with Cluster([a.address, b.address], output="discard", reconnect=False) as c:
        fut = c.options(retries=0).submit(_touch_and_sleep, str(marker), 30)
        _wait_for(marker)
        server_pid = int(marker.read_text().split()[1])
        victim, survivor = (a, b) if server_pid == a.pid else (b, a)
        victim.kill()
        with pytest.raises(rpycsvc.ServerLostError, match="retries=0"):
            fut.result(timeout=20)
        assert c[survivor.address].compute(abs, -1) == 1


def _touch_and_sleep(path: str, seconds: float) -> None:
    Path(path).write_text(f"{os.getpid()} {os.getppid()}")
    time.sleep(seconds)


def _wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.01)


def test_restarted_server_is_reconnected_and_add_works(server_process) -> None:  # type: ignore[no-untyped-def]
    a = server_process("--workers", "1")
    b = server_process("--workers", "1")
    port = b.port
    with Cluster([a.address, b.address], output="discard") as c:
        b.kill()
        deadline = time.monotonic() + 20
        while len(c.clients) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        b2 = server_process("--workers", "1", "--port", str(port))
        deadline = time.monotonic() + 20
        while len(c.clients) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(c.clients) == 2
        assert c[b.address].compute(os.getppid) == b2.pid
        extra = server_process("--workers", "1")
        c.add(extra.address)
        assert c[extra.address].compute(os.getppid) == extra.pid


def _spin() -> None:
    while True:
        pass


def test_timeout_kills_a_runaway_task_and_others_finish(server_process) -> None:  # type: ignore[no-untyped-def]
    srv = server_process("--workers", "2")
    with Cluster([srv.address], output="discard") as c:
        before = c[0].stats()["worker_pids"]
        runaway = c.options(timeout=0.5).submit(_spin)
        others = [c.submit(_work, i) for i in range(20)]
        with pytest.raises(rpycsvc.TaskTimeoutError, match=r"timeout of 0\.5"):
            runaway.result(timeout=30)
        assert isinstance(runaway.exception(), TimeoutError)
        assert [f.result(timeout=30) for f in others] == [i * 3 for i in range(20)]
        after = c[0].stats()
        assert set(after["worker_pids"]) != set(before)
        assert after["worker_restarts"] >= 1
        assert c.submit(abs, -5).result(timeout=30) == 5


def test_thread_mode_timeout(server_process) -> None:  # type: ignore[no-untyped-def]
    srv = server_process("--workers", "1")
    with Cluster([srv.address], output="discard") as c:
        fut = c.options(timeout=0.3, mode="thread").submit(_spin)
        with pytest.raises(rpycsvc.TaskTimeoutError):
            fut.result(timeout=30)
        assert c.options(mode="thread").submit(abs, -2).result(timeout=30) == 2


def test_cancel_running_and_queued_tasks(server_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = server_process("--workers", "1")
    with Cluster([srv.address], output="discard") as c:
        marker = tmp_path / "running"
        running = c.submit(_touch_and_sleep, str(marker), 60)
        _wait_for(marker)
        worker_pid = int(marker.read_text().split()[0])
        queued = c.submit(_touch_and_sleep, str(tmp_path / "never"), 0)
        # both were sent to the only server (two per worker): running, so stop(), not cancel()
        assert queued.stop()
        assert running.stop()
        for fut in (queued, running):
            with pytest.raises(rpycsvc.TaskCancelledError):
                fut.result(timeout=0)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{worker_pid}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{worker_pid}"), "the running task's worker lives on"
        assert c.submit(abs, -3).result(timeout=30) == 3
        assert not (tmp_path / "never").exists()


def test_concurrent_submitters_all_get_results(server_process) -> None:  # type: ignore[no-untyped-def]
    srv = server_process("--workers", "2")
    with Cluster([srv.address], output="discard") as c:
        out: dict[int, list[int]] = {}

        def run(t: int) -> None:
            out[t] = [c.submit(pow, t, i).result(timeout=60) for i in range(30)]

        threads = [threading.Thread(target=run, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert out == {t: [t**i for i in range(30)] for t in range(6)}
