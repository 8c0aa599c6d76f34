"""``cluster.executor()`` keeps the ``concurrent.futures`` contract (issue 17).

Each test body runs against a real one-worker server through ``cluster.executor()`` and
against ``ThreadPoolExecutor`` as the control, where the stdlib defines the behaviour.
Tasks coordinate through files: a task marks that it started and waits for a release
file, so the tests need no sleeps and no timing. The rpycsvc-only API (``stop()``) and
``Client.submit`` futures are tested on their own below.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import sys
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

import rpycsvc
from rpycsvc import Cluster, TaskCancelledError
from tests.support.servers import running_server

WAIT = 60.0  # the failure-case bound of every wait here


class Box:
    """A result that can be weakly referenced (to see who keeps it)."""

    def __init__(self, value: int) -> None:
        self.value = value


def make_box(value: int) -> Box:
    return Box(value)


def hold(marker: str, release: str, value: int) -> tuple[int, int]:
    """Mark that this task started (with its pid), wait for ``release``; bounded."""
    Path(marker + ".tmp").write_text(str(os.getpid()))
    os.replace(marker + ".tmp", marker)  # (whole: the test reads the pid once it exists)
    deadline = time.monotonic() + WAIT
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value, os.getpid()


def touch(path: str) -> str:
    Path(path).write_text("ran")
    return path


def eventually(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def released(ref: weakref.ref[Box]) -> bool:
    """True once nothing holds the object (a reader thread may still be finishing the
    callbacks of the task that returned it: the wait is bounded)."""
    gc.collect()
    return ref() is None


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def one_worker() -> Iterator[rpycsvc.Server]:
    with running_server(workers=1) as srv:
        yield srv


@pytest.fixture
def cluster(one_worker: rpycsvc.Server) -> Iterator[Cluster]:
    c = Cluster([one_worker.address], output="discard")
    try:
        yield c
    finally:
        c.close()


class Kind:
    """An executor under test and how many tasks it holds as running at once (a cluster
    sends a few tasks per worker ahead: those count as running, see TaskFuture)."""

    def __init__(self, ex: cf.Executor, slots: int) -> None:
        self.ex, self.slots = ex, slots


@pytest.fixture(params=["threads", "cluster"])
def kind(request: pytest.FixtureRequest, one_worker: rpycsvc.Server) -> Iterator[Kind]:
    if request.param == "threads":
        tp = ThreadPoolExecutor(max_workers=1)
        try:
            yield Kind(tp, 1)
        finally:
            tp.shutdown(wait=True)
        return
    c = Cluster([one_worker.address], output="discard")
    try:
        ex = c.executor()
        yield Kind(ex, c.total_workers * 2)  # (rpycsvc.client.jobs.PIPELINE)
        ex.shutdown(wait=False, cancel_futures=True)
    finally:
        c.close()


def fill(k: Kind, tmp: Path) -> tuple[list[cf.Future], Path]:
    """Occupy every slot of the executor; returns the futures and the release file."""
    release = tmp / "release"
    futs = [k.ex.submit(hold, str(tmp / f"started{i}"), str(release), i)
            for i in range(k.slots)]
    # Any of them: which one a server starts first is its business (the pool's order).
    eventually("a task to start", lambda: any(tmp.glob("started*")))
    return futs, release


# -- states: RUNNING, cancel(), cancel_futures --------------------------------------------------

def test_a_started_task_is_running_and_cancel_returns_false(kind: Kind, tmp_path: Path) -> None:
    futs, release = fill(kind, tmp_path)
    first = futs[0]
    assert first.running()
    assert not first.done()
    assert first.cancel() is False
    assert not first.cancelled()
    release.touch()
    assert first.result(timeout=WAIT)[0] == 0  # it ran to the end: cancel() left it alone
    assert [f.result(timeout=WAIT)[0] for f in futs] == list(range(kind.slots))


def test_a_pending_task_cancels_and_wait_sees_it_done(kind: Kind, tmp_path: Path) -> None:
    futs, release = fill(kind, tmp_path)
    never = tmp_path / "never"
    pending = kind.ex.submit(touch, str(never))
    assert not pending.running() and not pending.done()
    assert pending.cancel() is True
    assert pending.cancelled() and pending.done()
    with pytest.raises(cf.CancelledError):
        pending.result(timeout=0)
    release.touch()
    # No timeout, as the issue reports it: in the failure case this blocks for good (until
    # pytest-timeout). The stdlib's executor tells waiters when its worker reaches the
    # cancelled item, so the control passes only once the slots are released.
    done, not_done = cf.wait([pending])
    assert done == {pending} and not not_done
    assert list(cf.as_completed([pending], timeout=WAIT)) == [pending]
    assert [f.result(timeout=WAIT)[0] for f in futs] == list(range(kind.slots))
    kind.ex.shutdown(wait=True)
    assert not never.exists(), "a cancelled task ran"


def test_a_cluster_tells_waiters_of_a_cancel_at_once(cluster: Cluster, tmp_path: Path) -> None:
    """Stronger than the stdlib: the cancelled task leaves the cluster's queue at once, so
    ``wait`` and ``as_completed`` see it done while every server is still busy."""
    release = tmp_path / "release"
    ex = cluster.executor()
    held = [ex.submit(hold, str(tmp_path / f"started{i}"), str(release), i)
            for i in range(cluster.total_workers * 2)]
    try:
        eventually("a task to start", lambda: any(tmp_path.glob("started*")))
        pending = [ex.submit(touch, str(tmp_path / "never")) for _ in range(2)]
        assert all(f.cancel() for f in pending)
        # (the failure case: not done until the bound; the slots are still held here)
        done, not_done = cf.wait(pending, timeout=WAIT)
        assert done == set(pending) and not not_done
        assert set(cf.as_completed(pending, timeout=WAIT)) == set(pending)
        assert not any(f.done() for f in held)
    finally:
        release.touch()
    for f in held:
        f.result(timeout=WAIT)
    ex.shutdown(wait=True)
    assert not (tmp_path / "never").exists()


def test_shutdown_cancel_futures_cancels_only_pending_ones(kind: Kind, tmp_path: Path) -> None:
    futs, release = fill(kind, tmp_path)
    never = tmp_path / "never"
    pending = [kind.ex.submit(touch, str(never)) for _ in range(3)]
    kind.ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in pending)
    assert not any(f.cancelled() for f in futs)
    release.touch()
    assert [f.result(timeout=WAIT)[0] for f in futs] == list(range(kind.slots))
    kind.ex.shutdown(wait=True)
    assert not never.exists(), "a task cancelled by shutdown(cancel_futures=True) ran"


# -- map --------------------------------------------------------------------------------------

def test_map_submits_every_item_at_once(kind: Kind, tmp_path: Path) -> None:
    paths = [str(tmp_path / f"item{i}") for i in range(5)]
    it = kind.ex.map(touch, paths)  # never iterated
    eventually("every item of a map nobody iterates to run",
               lambda: all(os.path.exists(p) for p in paths))
    assert list(it) == paths


def test_map_and_submit_after_shutdown_raise(kind: Kind) -> None:
    kind.ex.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        kind.ex.map(abs, [-1, -2])
    with pytest.raises(RuntimeError):
        kind.ex.submit(abs, -1)


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_lets_go_of_a_result_it_yielded(kind: Kind, chunksize: int) -> None:
    it = kind.ex.map(make_box, range(4), chunksize=chunksize)
    first = next(it)
    assert first.value == 0
    ref = weakref.ref(first)
    del first
    eventually("the map iterator to let go of a result it yielded", lambda ref=ref: released(ref))
    assert [b.value for b in it] == [1, 2, 3]


def test_map_timeout_is_a_deadline_and_cancels_what_was_not_sent(kind: Kind,
                                                                   tmp_path: Path) -> None:
    release = tmp_path / "release"
    never = tmp_path / "never"
    blockers = [kind.ex.submit(hold, str(tmp_path / f"started{i}"), str(release), i)
                for i in range(kind.slots)]
    it = kind.ex.map(touch, [str(never)], timeout=0.5)
    # (rpycsvc: RpycsvcTimeoutError, both; the stdlib's before 3.11: cf.TimeoutError only)
    with pytest.raises((TimeoutError, cf.TimeoutError)) as info:
        next(it)
    if isinstance(kind.ex, rpycsvc.ClusterExecutor):
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, cf.TimeoutError)
    release.touch()
    for f in blockers:
        f.result(timeout=WAIT)
    kind.ex.shutdown(wait=True)
    if isinstance(kind.ex, ThreadPoolExecutor) and sys.version_info < (3, 11):
        return  # (the stdlib's map before 3.11 forgot to cancel the item it timed out on)
    assert not never.exists(), "the timed-out map's unsent item ran"


def test_cluster_map_stays_lazy_and_lets_go_of_yielded_results(cluster: Cluster,
                                                                tmp_path: Path) -> None:
    paths = [str(tmp_path / f"item{i}") for i in range(3)]
    it = cluster.map(touch, paths)  # lazy: nothing is sent before the first next()
    assert cluster.submit(abs, -1).result(timeout=WAIT) == 1  # a round trip later...
    assert not any(os.path.exists(p) for p in paths)
    assert next(it) == paths[0]
    for chunksize in (1, 3):
        boxes = cluster.map(make_box, range(6), chunksize=chunksize)
        first = next(boxes)
        ref = weakref.ref(first)
        del first
        eventually("Cluster.map to let go of a result it yielded", lambda ref=ref: released(ref))
        assert [b.value for b in boxes] == [1, 2, 3, 4, 5]


# -- stop(): ours, not the stdlib's ------------------------------------------------------------

def test_stop_stops_a_running_task_on_its_server(cluster: Cluster, tmp_path: Path) -> None:
    release = tmp_path / "release"
    fut = cluster.submit(hold, str(tmp_path / "started"), str(release), 1)
    eventually("the task to start", (tmp_path / "started").exists)
    pid = int((tmp_path / "started").read_text())
    assert fut.running()
    assert fut.stop() is True
    assert fut.done() and not fut.cancelled()
    with pytest.raises(TaskCancelledError):
        fut.result(timeout=0)
    eventually(f"the stopped task's worker {pid} to be killed", lambda: gone(pid))
    assert cluster.submit(abs, -3).result(timeout=WAIT) == 3  # a new worker serves
    assert fut.stop() is False  # finished: nothing to stop


def test_stop_on_a_pending_task_cancels_it(cluster: Cluster, tmp_path: Path) -> None:
    release = tmp_path / "release"
    held = [cluster.submit(hold, str(tmp_path / f"started{i}"), str(release), i)
            for i in range(cluster.total_workers * 2)]
    # Any of them: which one a worker takes first is the scheduler's business (the pool's,
    # and on a loaded machine a worker may take its next task late).
    eventually("a held task to start",
               lambda: any((tmp_path / f"started{i}").exists() for i in range(len(held))))
    never = tmp_path / "never"
    pending = cluster.submit(touch, str(never))
    assert not pending.running()
    assert pending.stop() is True
    assert pending.cancelled()
    assert cf.wait([pending], timeout=WAIT).done == {pending}
    release.touch()
    for f in held:
        f.result(timeout=WAIT)
    assert cluster.submit(abs, -1).result(timeout=WAIT) == 1
    assert not never.exists()


def test_client_submit_futures_are_running_and_stop_stops_them(one_worker: rpycsvc.Server,
                                                               tmp_path: Path) -> None:
    release = tmp_path / "release"
    with rpycsvc.connect(one_worker.address, output="discard") as c:
        fut = c.submit(hold, str(tmp_path / "started"), str(release), 7)
        assert fut.running()  # sent to the server at once
        eventually("the task to start", (tmp_path / "started").exists)
        pid = int((tmp_path / "started").read_text())
        assert fut.cancel() is False and not fut.done()
        assert fut.stop() is True
        with pytest.raises(TaskCancelledError):
            fut.result(timeout=0)
        eventually(f"the stopped task's worker {pid} to be killed", lambda: gone(pid))
        assert c.compute(abs, -4) == 4
        done = c.submit(abs, -1)
        assert done.result(timeout=WAIT) == 1
        assert done.cancel() is False and done.stop() is False
