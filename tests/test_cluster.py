"""Cluster API against real local servers: futures, map, map_reduce, broadcast, executor."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import io
import itertools
import operator
import os
import time
from collections.abc import Iterator

import pytest

import rpycsvc
from rpycsvc import Cluster
from rpycsvc.client.discovery import read_hosts_file


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster.local(2, workers=1, output="capture") as c:
        yield c


def test_local_starts_two_servers_and_stops_them() -> None:
    c = Cluster.local(2, workers=1)
    try:
        pids = [s["pid"] for s in c.stats().values()]  # type: ignore[index]
        assert len(c.addresses) == 2
        assert sorted(c.broadcast(os.getppid).succeeded.values()) == sorted(pids)
    finally:
        c.close()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return True


def test_submit_returns_a_stdlib_future(cluster: Cluster) -> None:
    fut = cluster.submit(operator.add, 2, 3)
    assert isinstance(fut, cf.Future)
    assert fut.result(timeout=30) == 5
    futs = [cluster.submit(pow, 2, i) for i in range(10)]
    _, not_done = cf.wait(futs, timeout=30)
    assert not not_done
    powers = [2**i for i in range(10)]
    assert sorted(f.result() for f in cf.as_completed(futs, timeout=30)) == powers
    assert sorted(f.result() for f in cluster.as_completed(futs, timeout=30)) == powers


def test_asyncio_wrap_future(cluster: Cluster) -> None:
    async def main() -> int:
        return await asyncio.wrap_future(cluster.submit(lambda: 41 + 1))

    assert asyncio.run(asyncio.wait_for(main(), 30)) == 42


def test_map_ordered_unordered_and_chunked(cluster: Cluster) -> None:
    assert list(cluster.map(lambda x: x * x, range(50), timeout=60)) == [x * x for x in range(50)]
    assert list(cluster.map(operator.add, range(5), range(10, 15))) == [10, 12, 14, 16, 18]
    unordered = cluster.map(lambda x: -x, range(40), ordered=False)
    assert sorted(unordered) == sorted(-x for x in range(40))
    assert list(cluster.map(str, range(100), chunksize=7)) == [str(x) for x in range(100)]


def test_map_is_lazy_on_an_endless_generator(cluster: Cluster) -> None:
    taken = itertools.count()
    consumed = []

    def source() -> Iterator[int]:
        for i in taken:
            consumed.append(i)
            yield i

    results = cluster.map(lambda x: x + 1, source())
    first = list(itertools.islice(results, 20))
    results.close()  # type: ignore[attr-defined]
    assert first == list(range(1, 21))
    # bounded read-ahead, not the whole (endless) input: at most a window of chunks in flight
    # (2 per worker slot: 8 here) of at most MAX_CHUNK items each, cheap items making big chunks
    assert len(consumed) < 100_000


def test_map_reraises_the_task_error_in_order(cluster: Cluster) -> None:
    def f(x: int) -> int:
        if x == 7:
            raise ValueError(f"bad {x}")
        return x

    it = cluster.map(f, range(20), chunksize=3)
    assert [next(it) for _ in range(7)] == list(range(7))
    with pytest.raises(ValueError, match="bad 7") as info:
        next(it)
    assert "bad 7" in info.value.remote_traceback  # type: ignore[attr-defined]


def test_map_timeout_raises_timeout_error(cluster: Cluster) -> None:
    it = cluster.map(time.sleep, [0.0, 30.0], chunksize=1, timeout=1.0)
    assert next(it) is None
    with pytest.raises(TimeoutError):
        next(it)
    it.close()  # type: ignore[attr-defined]


def test_map_reduce_plain_and_by_key(cluster: Cluster) -> None:
    assert cluster.map_reduce(lambda x: x * 2, operator.add, range(101)) == 2 * sum(range(101))
    assert cluster.map_reduce(lambda x: x, operator.add, range(10), initializer=100) == 145
    text = "the cat and the hat and the bat".split()
    counts = cluster.map_reduce(lambda w: [(w, 1)], operator.add, text, by_key=True)
    assert counts == {"the": 3, "cat": 1, "and": 2, "hat": 1, "bat": 1}
    # order-sensitive reducer: partials are combined in input order
    joined = cluster.map_reduce(str, operator.add, range(30), chunksize=4)
    assert joined == "".join(map(str, range(30)))


def test_broadcast_succeeded_and_failed(cluster: Cluster) -> None:
    res = cluster.broadcast(os.getpid)
    assert set(res) == set(cluster.addresses)
    assert len(set(res.succeeded.values())) == 2 and not res.failed

    res = cluster.broadcast(lambda: 1 / 0)
    assert set(res.failed) == set(cluster.addresses)
    assert all(isinstance(e, ZeroDivisionError) for e in res.failed.values())


def test_executor_is_a_real_executor(cluster: Cluster) -> None:
    with cluster.executor() as ex:
        assert isinstance(ex, cf.Executor)
        assert ex.submit(sum, [1, 2, 3]).result(30) == 6
        assert list(ex.map(abs, [-1, -2, -3])) == [1, 2, 3]
    with pytest.raises(RuntimeError):
        ex.submit(sum, [1])


def test_getitem_gives_classic_access(cluster: Cluster) -> None:
    first = cluster[0]
    assert isinstance(first, rpycsvc.Client)
    assert cluster[first.address] is first
    pid = first.modules.os.getpid()
    assert pid == first.stats()["pid"]
    with pytest.raises(KeyError, match="no server"):
        cluster["10.255.255.1:1"]


def test_capture_mode_puts_output_on_the_future(cluster: Cluster) -> None:
    fut = cluster.submit(print, "captured line")
    fut.result(30)
    assert fut.stdout == "captured line\n"


def test_progress_bar_on_stderr(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert len(list(cluster.map(abs, range(30), progress=True, chunksize=5))) == 30
    err = capsys.readouterr().err
    assert "30/30" in err and "/s" in err


def test_servers_with_more_workers_get_more_tasks(server_process) -> None:  # type: ignore[no-untyped-def]
    big = server_process("--workers", "2")
    small = server_process("--workers", "1")
    with Cluster([big.address, small.address], output="discard") as c:
        pids = list(c.map(_slow_ppid, [0.05] * 30, chunksize=1))
    assert pids.count(big.pid) > pids.count(small.pid) > 0


def _slow_ppid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getppid()


def test_unreachable_server_is_reported_and_skipped(server_process) -> None:  # type: ignore[no-untyped-def]
    live = server_process("--workers", "1")
    dead = _free_port_address()
    with Cluster([live.address, dead], timeout=5) as c:
        assert list(c.unreachable) == [dead]
        assert "can't connect" in str(c.unreachable[dead])
        assert c.submit(lambda: "fine").result(30) == "fine"
    with pytest.raises(rpycsvc.ConnectError, match=dead):
        Cluster([live.address, dead], require_all=True, timeout=5)
    with pytest.raises(rpycsvc.AllServersFailedError, match=dead):
        Cluster([dead], timeout=5)


def _free_port_address() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def test_hosts_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "hosts"
    path.write_text("# servers\nhost1:18812\n\n  host2   # the second one\n")
    assert read_hosts_file(str(path)) == ["host1:18812", "host2"]
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(rpycsvc.ConfigError, match="names no servers"):
        read_hosts_file(str(tmp_path / "empty"))
    with pytest.raises(rpycsvc.ConfigError, match="can't read hosts file"):
        read_hosts_file(str(tmp_path / "missing"))


def test_bad_options_are_refused(cluster: Cluster) -> None:
    with pytest.raises(rpycsvc.ConfigError, match="unknown task option 'timout'"):
        cluster.options(timout=3)
    with pytest.raises(rpycsvc.ConfigError, match="timeout must be a positive"):
        cluster.options(timeout=-1)
    with pytest.raises(rpycsvc.ConfigError, match="chunksize must be >= 1"):
        list(cluster.map(abs, [1], chunksize=0))
    with pytest.raises(rpycsvc.ConfigError, match="map needs at least one iterable"):
        cluster.map(abs)


def test_stdout_stream_is_prefixed(capfd: pytest.CaptureFixture[str]) -> None:
    with Cluster.local(1, workers=1) as c:
        c.submit(print, "hello stream").result(30)
        addr = c.addresses[0]
    out = capfd.readouterr().out
    assert f"[{addr}] hello stream\n" in out


def test_progress_render_without_total() -> None:
    from rpycsvc.client.progress import Progress

    buf = io.StringIO()
    p = Progress(None, stream=buf)
    p.update(5, "a:1")
    assert "5/?" in p.render()


def test_abandoned_map_stops_its_tasks_on_the_servers(cluster: Cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    marker = tmp_path / "started"
    it = cluster.map(_mark_and_sleep, [(str(marker), 30)], chunksize=1, timeout=5)
    with pytest.raises(TimeoutError):  # the map gives up on the result: abandoned
        next(it)
    pid = int(Path(marker).read_text())
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}") and not _zombie(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), "abandoned task still running"
    assert cluster.submit(abs, -1).result(timeout=30) == 1


def _mark_and_sleep(args: tuple[str, float]) -> None:
    path, seconds = args
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)


def _square(x: int) -> int:
    return x * x


def test_finished_tasks_leave_no_reference_cycles() -> None:
    """A finished cluster task is freed by reference counting (its future no longer holds
    its job, which holds the future): no garbage piles up for the cyclic collector, whose
    full collections pause every thread (before: 17 objects per task). The server runs in a
    process of its own, so only this client's garbage is counted."""
    import gc

    from tests.support.servers import ServerProcess

    n = 400
    with ServerProcess("--workers", "2") as srv, \
            Cluster([srv.address], output="discard") as cluster:
        for i in range(50):  # warm-up: imports, caches, the chunk sizer
            cluster.submit(_square, i).result(timeout=60)
        gc.collect()
        gc.disable()
        try:
            futs = [cluster.submit(_square, i) for i in range(n)]
            assert [f.result(timeout=60) for f in futs] == [i * i for i in range(n)]
            stopped = cluster.submit(time.sleep, 30)
            assert stopped.stop()
            del futs, stopped
            garbage = gc.collect()
        finally:
            gc.enable()
    assert garbage < n, f"{garbage} objects in reference cycles after {n} submits"
