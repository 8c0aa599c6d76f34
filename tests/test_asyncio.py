"""The asyncio API (rpycsvc.client.aio) against real servers: results, streaming maps, and
cancellation that reaches the servers (the task's worker process is gone)."""

from __future__ import annotations

import asyncio
import gc
import operator
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, Callable, TypeVar

import psutil
import pytest

import rpycsvc
from rpycsvc import AsyncCluster, aconnect
from tests.support.byvalue import tasks_by_value  # noqa: F401
from tests.support.servers import running_server

T = TypeVar("T")
WAIT = 60.0  # bound of every wait below (a busy machine is slow, never this slow)


@pytest.fixture(scope="module")
def addresses() -> Iterator[list[str]]:
    """Two in-process servers (2 workers each) for the module."""
    with running_server() as a, running_server() as b:
        yield [a.address, b.address]


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 120)
    return asyncio.run(bounded())


async def until(pred: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``pred`` (on the loop) until it returns something true, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- tasks (pickled by value) -------------------------------------------------------------------
def square(x: int) -> int:
    return x * x


def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


def sleeper(path: str, seconds: float = 300.0) -> int:
    """Write our pid to ``path``, then sleep: a task that runs until it is stopped."""
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def first_fast(i: int, folder: str) -> int:
    """Item 0 returns at once; every other item writes its worker's pid and sleeps."""
    if i == 0:
        return 0
    Path(folder, f"{i}.pid").write_text(str(os.getpid()))
    time.sleep(300)
    return i


def size_of(data: bytes) -> int:
    return len(data)


def first_of_empty() -> Any:
    return next(iter([]))  # raises StopIteration, which asyncio futures refuse to hold


def slow_identity(x: int) -> int:
    time.sleep(0.3)
    return x


async def pid_from(path: Path) -> int:
    return int(await until(lambda: path.exists() and path.read_text(), f"{path} written"))


async def worker_stopped(cluster: AsyncCluster, pid: int) -> None:
    """The worker ``pid`` is gone and its server replaced it (stats no longer list it)."""
    await until(lambda: gone(pid), f"worker {pid} gone")

    async def replaced() -> bool:
        stats = await cluster.stats()
        return all(isinstance(s, dict) and pid not in s["worker_pids"] for s in stats.values())

    deadline = time.monotonic() + WAIT
    while not await replaced():
        assert time.monotonic() < deadline, f"worker {pid} still listed in stats()"
        await asyncio.sleep(0.05)


# -- results ------------------------------------------------------------------------------------
def test_submit_map_map_reduce_as_completed(addresses: list[str]) -> None:
    async def main() -> None:
        async with AsyncCluster(addresses) as cluster:
            assert await cluster.submit(square, 7) == 49
            assert [r async for r in cluster.map(square, range(50))] == \
                [x * x for x in range(50)]
            unordered = [r async for r in cluster.map(square, range(50), ordered=False)]
            assert sorted(unordered) == [x * x for x in range(50)]
            assert await cluster.map_reduce(square, lambda a, b: a + b, range(100)) == \
                sum(x * x for x in range(100))
            futs = [cluster.submit(square, i) for i in range(10)]
            seen = [f.result() async for f in cluster.as_completed(futs)]
            assert sorted(seen) == [i * i for i in range(10)]
            with pytest.raises(ValueError, match="bad 3"):
                await cluster.submit(fail, 3)
            with pytest.raises(ValueError, match="bad 5"):
                async for _ in cluster.map(fail, [5]):
                    pass
            # the sync cluster's options, per task
            with pytest.raises(rpycsvc.TaskTimeoutError):
                await cluster.options(timeout=0.5).submit(time.sleep, 30)

    run(main())


def test_a_task_raising_stop_iteration_fails_and_strands_no_other_result(
        addresses: list[str]) -> None:
    """``next()`` on an empty iterator in a task: the awaiting coroutine gets a RuntimeError
    caused by the StopIteration (as PEP 479 does for generators) instead of hanging, and a
    result that reached the loop in the same batch is still delivered (review finding: both
    hung, the batch's hand-over aborted by asyncio's TypeError)."""
    async def main() -> None:
        async with AsyncCluster(addresses) as cluster:
            bad = cluster.submit(first_of_empty)
            good = cluster.submit(slow_identity, 42)
            time.sleep(1.5)  # the loop is busy: both results arrive in one batch
            with pytest.raises(RuntimeError, match="StopIteration") as info:
                await asyncio.wait_for(bad, WAIT)
            assert isinstance(info.value.__cause__, StopIteration)
            assert await asyncio.wait_for(good, WAIT) == 42
            async with await aconnect(addresses[0]) as client:
                with pytest.raises(RuntimeError, match="StopIteration"):
                    await asyncio.wait_for(client.submit(first_of_empty), WAIT)

    run(main())


def test_ten_thousand_awaited_submits_complete(addresses: list[str]) -> None:
    async def main() -> None:
        async with AsyncCluster(addresses, output="discard") as cluster:
            before = await cluster.stats()
            results = await asyncio.gather(*(cluster.submit(square, i) for i in range(10_000)))
            assert results == [i * i for i in range(10_000)]
            after = await cluster.stats()
            done = sum(after[a]["tasks_done"] - before[a]["tasks_done"]  # type: ignore[index]
                       for a in addresses)
            assert done >= 10_000

    run(main())


def test_large_arguments_and_aconnect(addresses: list[str]) -> None:
    blob = os.urandom(3 << 20)  # pickled and sent off the loop's thread

    async def main() -> None:
        async with await aconnect(addresses[0]) as client:
            assert await client.submit(size_of, blob) == len(blob)
            assert await client.submit(size_of, [blob[:1 << 20], blob]) == 2
            assert await client.compute(square, 9) == 81
            stats = await client.stats()
            assert stats["workers"] == client.workers == 2
        async with AsyncCluster(addresses) as cluster:
            sizes = await asyncio.gather(*(cluster.submit(size_of, blob) for _ in range(4)))
            assert sizes == [len(blob)] * 4
            for c in cluster.clients:
                assert (await c.stats())["tasks_done"] >= 1

    run(main())


def test_local_cluster_and_misuse() -> None:
    async def main() -> None:
        cluster = AsyncCluster.local(1, output="discard")
        with pytest.raises(rpycsvc.RpycsvcError, match="not started"):
            cluster.submit(square, 2)
        async with cluster:
            assert await cluster.submit(square, 3) == 9
            assert len(cluster.clients) == 1
            pid = (await cluster.clients[0].stats())["pid"]
        assert gone(pid) or not psutil.pid_exists(pid)

    run(main())


# -- cancellation reaches the server --------------------------------------------------------------
def test_cancelling_the_awaiting_task_stops_the_worker(addresses: list[str],
                                                       tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncCluster(addresses) as cluster:
            path = tmp_path / "pid"
            waiter = asyncio.ensure_future(cluster.submit(sleeper, str(path)))
            pid = await pid_from(path)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await worker_stopped(cluster, pid)
            assert await cluster.submit(square, 4) == 16  # the replaced worker works

    run(main())


def test_wait_for_timeout_stops_the_worker(addresses: list[str], tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncCluster(addresses) as cluster:
            path = tmp_path / "pid"
            fut = cluster.submit(sleeper, str(path))
            pid = await pid_from(path)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(fut, 0.2)
            assert fut.cancelled()
            await worker_stopped(cluster, pid)

    run(main())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is Python 3.11+")
def test_asyncio_timeout_stops_the_worker(addresses: list[str], tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncCluster(addresses) as cluster:
            path = tmp_path / "pid"
            fut = cluster.submit(sleeper, str(path))
            pid = await pid_from(path)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):  # type: ignore[attr-defined]
                    await fut
            assert fut.cancelled()
            await worker_stopped(cluster, pid)

    run(main())


async def arange(n: int, pause_every: int = 0) -> AsyncIterator[int]:
    """0 .. n-1 as an async generator (yielding to the loop every ``pause_every`` items)."""
    for i in range(n):
        if pause_every and i % pause_every == 0:
            await asyncio.sleep(0)
        yield i


def test_map_takes_async_iterables(addresses: list[str]) -> None:
    """An async iterable (an async generator, say a stream of requests) maps as a plain one:
    alone, zipped with plain iterables, in order or not; an error it raises ends the map
    with that error; the sync map refuses one with a clear error, before sending anything."""
    async def main() -> None:
        async with AsyncCluster(addresses) as cluster:
            assert [r async for r in cluster.map(square, arange(300, pause_every=7))] == \
                [x * x for x in range(300)]
            got = [r async for r in cluster.map(operator.add, arange(50), range(100, 140))]
            assert got == [x + 100 + x for x in range(40)]  # zip: the shorter one ends it
            unordered = [r async for r in cluster.map(square, arange(60), ordered=False)]
            assert sorted(unordered) == [x * x for x in range(60)]
            assert [r async for r in cluster.map(square, arange(0))] == []
            assert await cluster.map_reduce(square, operator.add, arange(100)) == \
                sum(x * x for x in range(100))

            async def broken() -> AsyncIterator[int]:
                for i in range(100):
                    yield i
                raise KeyError("the source broke")
            got = []
            with pytest.raises(KeyError, match="the source broke"):
                async for r in cluster.map(square, broken()):
                    got.append(r)
            assert got == [x * x for x in range(100)]  # what it gave first, as builtin map

            def broken_plain() -> Iterator[int]:
                yield from range(50)
                raise KeyError("the plain source broke")
            got = []
            with pytest.raises(KeyError, match="the plain source broke"):
                async for r in cluster.map(square, broken_plain()):
                    got.append(r)
            assert got == [x * x for x in range(50)]
            async def cancelled_inside() -> AsyncIterator[int]:  # its own CancelledError
                for i in range(10):
                    yield i
                waiting = asyncio.get_running_loop().create_future()
                waiting.cancel()
                await waiting
            got = []
            with pytest.raises(asyncio.CancelledError):
                async for r in cluster.map(square, cancelled_inside()):
                    got.append(r)
            assert got == [x * x for x in range(10)]  # not a silent, shortened end

            read = 0

            async def endless() -> AsyncIterator[int]:
                nonlocal read
                while True:
                    read += 1
                    yield read
                    await asyncio.sleep(0)
            results = cluster.map(square, endless())
            for _ in range(20):
                await results.__anext__()
            await asyncio.sleep(0.5)
            assert read < 100_000  # read as far as the next chunks need, not all it can
            await results.aclose()  # type: ignore[attr-defined]
            with pytest.raises(rpycsvc.ConfigError, match=r"AsyncCluster\.map"):
                cluster.cluster.map(square, arange(3))
            with pytest.raises(rpycsvc.ConfigError, match=r"AsyncCluster\.map_reduce"):
                cluster.cluster.map_reduce(square, operator.add, arange(3))
            assert await cluster.submit(square, 3) == 9  # the cluster serves on

    run(main())


def test_an_async_source_that_pauses_delays_only_what_it_has_not_given(
        addresses: list[str]) -> None:
    """A stream of requests that goes quiet: the items it gave are answered at once, not
    when their chunk would be full; the map's ``timeout`` holds while it waits for more;
    leaving the loop stops the read of the source too."""
    async def main() -> None:
        quiet = asyncio.Event()  # set by the test: the source speaks again

        async def requests() -> AsyncIterator[int]:
            for i in range(3):
                yield i
            await quiet.wait()
            yield 3

        async with AsyncCluster(addresses) as cluster:
            seen = []
            async for r in cluster.map(square, requests()):
                seen.append(r)
                if r == 4:  # items 0..2 all answered while the source is quiet
                    quiet.set()
            assert seen == [0, 1, 4, 9]

            quiet.clear()
            t0 = time.monotonic()
            with pytest.raises(rpycsvc.RpycsvcTimeoutError):
                async for _ in cluster.map(square, requests(), timeout=1.0):
                    pass
            assert time.monotonic() - t0 < WAIT  # (not until the source spoke: never)

    run(main())


def test_leaving_a_map_early_stops_its_chunks(addresses: list[str], tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncCluster(addresses) as cluster:
            async for first in cluster.map(first_fast, range(8), [str(tmp_path)] * 8,
                                           chunksize=1):
                assert first == 0
                # some of the slow items are running by now: their workers must go
                await until(lambda: list(tmp_path.glob("*.pid")), "a slow item started")
                break
            pids = [int(p.read_text()) for p in tmp_path.glob("*.pid") if p.read_text()]
            for pid in pids:
                await worker_stopped(cluster, pid)

            async def running() -> int:
                stats = await cluster.stats()
                return sum(s["tasks_running"] for s in stats.values()  # type: ignore[index]
                           if isinstance(s, dict))
            deadline = time.monotonic() + WAIT
            while await running():
                assert time.monotonic() < deadline, "the map's chunks still run"
                await asyncio.sleep(0.05)

    run(main())


def test_map_reduce_cancelled_stops_its_chunks(addresses: list[str], tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncCluster(addresses) as cluster:
            job = asyncio.ensure_future(cluster.map_reduce(
                lambda i: first_fast(i + 1, str(tmp_path)), lambda a, b: a + b, range(2),
                chunksize=1))
            await until(lambda: len(list(tmp_path.glob("*.pid"))) == 2, "both chunks run")
            pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job
            for pid in pids:
                await worker_stopped(cluster, pid)

    run(main())


# -- the loop never waits for the network ------------------------------------------------------
def test_control_calls_leave_the_loop_running(server_process: Any) -> None:
    """A frozen server's stats() can't answer; the loop keeps running meanwhile."""
    srv = server_process("--workers", "1")

    async def main() -> None:
        async with AsyncCluster([srv.address]) as cluster:
            client = cluster.clients[0]
            os.kill(srv.pid, signal.SIGSTOP)
            try:
                stats = asyncio.ensure_future(client.stats())
                ticks = 0
                while ticks < 20:  # the loop runs other coroutines while stats() waits
                    await asyncio.sleep(0.01)
                    ticks += 1
                assert not stats.done()
            finally:
                os.kill(srv.pid, signal.SIGCONT)
            assert (await asyncio.wait_for(stats, WAIT))["workers"] == 1

    run(main())


def test_closed_cluster_says_so(addresses: list[str]) -> None:
    async def main() -> None:
        cluster = await AsyncCluster(addresses)
        client = cluster.clients[0]
        await cluster.close()
        await cluster.close()  # (twice is fine)
        with pytest.raises(rpycsvc.RpycsvcError, match="closed"):
            cluster.submit(square, 2)
        with pytest.raises(rpycsvc.RpycsvcError, match="closed"):
            await client.stats()

    run(main())


def test_map_and_map_reduce_progress(addresses: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``progress=True``: the sync map's bar; off a terminal, one summary line at the end
    with the items each server delivered."""
    async def main() -> None:
        async with AsyncCluster(addresses) as cluster:
            got = [y async for y in cluster.map(square, range(40), chunksize=3,
                                                progress=True)]
            assert got == [i * i for i in range(40)]
            assert await cluster.map_reduce(square, operator.add, range(30), chunksize=4,
                                            progress=True) == sum(i * i for i in range(30))
            got = [y async for y in cluster.map(square, range(12), ordered=False)]
            assert sorted(got) == [i * i for i in range(12)]  # (no bar asked: no line)

    run(main())
    lines = [ln for ln in capsys.readouterr().err.splitlines() if " done in " in ln]
    assert len(lines) == 2, lines
    for line, total in zip(lines, (40, 30)):
        assert line.startswith(f"{total}/{total} done in "), line
        counts = re.findall(r"(\S+):(\d+)(?= |$)", line.split(" | ", 1)[1])
        assert {a for a, _ in counts} <= set(addresses)
        assert sum(int(n) for _, n in counts) == total, line


def test_wait_first_completed_first_exception_all_and_timeout(
        addresses: list[str], tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncCluster(addresses) as cluster:
            assert await cluster.wait([]) == (set(), set())
            futs = [cluster.submit(square, i) for i in range(6)]
            sync_fut = cluster.cluster.submit(square, 7)  # a sync TaskFuture, waited here
            done, not_done = await cluster.wait([*futs, sync_fut], timeout=WAIT)
            assert done == {*futs, sync_fut} and not not_done
            assert sync_fut.result() == 49 and [f.result() for f in futs] == [
                i * i for i in range(6)]

            slow = cluster.submit(sleeper, str(tmp_path / "slow.pid"))
            fast = cluster.submit(square, 5)
            done, not_done = await cluster.wait([slow, fast], return_when="FIRST_COMPLETED")
            assert done == {fast} and not_done == {slow}

            bad = cluster.submit(fail, 3)
            done, not_done = await cluster.wait([slow, bad],
                                                return_when=asyncio.FIRST_EXCEPTION)
            assert done == {bad} and not_done == {slow}
            assert isinstance(bad.exception(), ValueError)

            # a timeout returns what is done so far and cancels nothing: slow runs on
            done, not_done = await cluster.wait([slow], timeout=0.05)
            assert not done and not_done == {slow} and not slow.done()
            pid = await pid_from(tmp_path / "slow.pid")
            slow.cancel()  # (stopping it is the caller's to do)
            await worker_stopped(cluster, pid)

            async def later() -> int:
                return await cluster.submit(square, 2)
            done, _ = await cluster.wait([later()])
            assert [t.result() for t in done] == [4]  # a coroutine runs as a task

            with pytest.raises(rpycsvc.ConfigError, match="return_when"):
                await cluster.wait(futs, return_when="SOMETIME")

    run(main())


def test_awaited_submits_leave_no_reference_cycles(server_process: Any) -> None:
    """A finished awaited task is freed by reference counting: no garbage for the cyclic
    collector, whose full collections would pause the event loop (its lag). The server
    runs in a process of its own, so only this client's garbage is counted."""
    srv = server_process("--workers", "2")
    n = 400

    async def main() -> int:
        async with AsyncCluster([srv.address], output="discard") as cluster:
            async def worker(numbers: Iterator[int]) -> None:
                for i in numbers:
                    assert await cluster.submit(square, i) == i * i
            numbers = iter(range(50))
            await asyncio.gather(*(worker(numbers) for _ in range(8)))  # warm-up
            gc.collect()
            gc.disable()
            try:
                numbers = iter(range(n))
                await asyncio.gather(*(worker(numbers) for _ in range(8)))
                return gc.collect()
            finally:
                gc.enable()

    garbage = run(main())
    # (before: ~20 objects per task; a few stray ones from the machinery are fine)
    assert garbage < n, f"{garbage} objects in reference cycles after {n} awaited submits"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_asyncio_section_reports_every_figure() -> None:
    """``rpycsvc bench --asyncio --quick --json``: the figures are there, each result was
    checked (speed targets only say PASS/MISS: no timed assert here)."""
    import json
    import math
    import subprocess

    from tests.support.servers import REPO

    proc = subprocess.run(
        [sys.executable, "-m", "rpycsvc.cli", "bench", "--asyncio", "--quick", "--json"],
        capture_output=True, text=True, timeout=360, cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["errors"] == []
    assert set(doc["figures"]) == {"asyncio_submit_throughput", "asyncio_submit_p50",
                                   "asyncio_loop_lag_p99", "asyncio_loop_lag_max"}
    for fig in doc["figures"].values():
        assert math.isfinite(fig["value"]) and fig["value"] >= 0
        assert (fig["passed"] is None) == (not fig["target"])
    assert set(doc["checks"]) >= {"asyncio.sync_submit.results",
                                  "asyncio.awaited_submit.results", "asyncio.latency.results"}
