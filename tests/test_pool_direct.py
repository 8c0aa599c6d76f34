"""The worker pool driven directly: the one scheduler, with real worker processes.

``WorkerPool.submit(Task)`` and ``Task.on_done(task, ok, frames, err)`` are the pool's
interface to the server's task handler; these tests use just that (plus ``stats()``,
``running_tasks()``, ``durations()`` and worker pids), no server and no client.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psutil
import pytest

from rpycsvc.errors import (
    ServerDrainingError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from rpycsvc.protocol.serialization import dumps, dumps_function, loads
from rpycsvc.server.pool import WorkerPool
from rpycsvc.server.task import Task

# -- tasks (run in workers; module-level so they pickle by reference) ----------------------


def add(a: int, b: int) -> int:
    return a + b


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def boom(text: str) -> None:
    raise ValueError(text)


def die(code: int) -> None:
    os._exit(code)


def chatty(n: int) -> int:
    for i in range(n):
        print(f"line {i}")
    return n


def whose_pid() -> int:
    return os.getpid()


def double(arr: Any) -> Any:
    return arr * 2


def wait_for_file(path: str) -> str:
    """Say we started (the file ``path + '.started'``), then wait (bounded) for ``path``."""
    with open(path + ".started", "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return path


# -- helpers -------------------------------------------------------------------------------


class Outcome:
    """What ``on_done`` was called with, once; waited for with a bound."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok: bool | None = None
        self.frames: list[Any] | None = None
        self.err: BaseException | None = None
        self.service_s: float | None = None
        self.calls = 0
        self.output: list[tuple[int, Any]] = []
        self.note: tuple[list[str], str] | None = None  # (where, what) to append on done

    def on_done(self, task: Task, ok: bool, frames: list[Any] | None,
                err: BaseException | None) -> None:
        self.calls += 1
        self.ok, self.frames, self.err = ok, frames, err
        self.service_s = task.service_s  # must be set before on_done runs
        if self.note is not None:
            self.note[0].append(self.note[1])
        self.event.set()

    def on_output(self, fd: int, text: Any) -> None:
        self.output.append((fd, text))

    def wait(self, timeout: float = 60.0) -> Outcome:
        assert self.event.wait(timeout), f"no on_done within {timeout:g} s"
        return self

    def value(self, timeout: float = 60.0) -> Any:
        self.wait(timeout)
        assert self.ok, f"the task failed: {self.err!r} {self.frames!r}"
        assert self.frames is not None
        return loads(self.frames, "result", writable=False)


def submit(pool: WorkerPool, fn: Callable[..., Any], *args: Any, owner: Any = "c1",
           mode: str = "process", timeout: float | None = None) -> tuple[int, Outcome]:
    out = Outcome()
    frames = (dumps_function(fn), *dumps((args, {}), "arguments"))
    task = Task("pickled", None, frames, out.on_done, owner=owner, mode=mode,
                timeout=timeout, on_output=out.on_output, label=fn.__name__,
                client=str(owner), options={"output": True})
    return pool.submit(task), out


def wait_until(what: str, pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    p = WorkerPool(1, threads=4)
    p.start()
    try:
        yield p
    finally:
        p.close(grace=0)


# -- results and service time --------------------------------------------------------------


def test_result_and_service_time(pool: WorkerPool) -> None:
    _, out = submit(pool, add, 2, 3)
    assert out.value() == 5
    assert isinstance(out.service_s, float) and out.service_s >= 0
    _, out = submit(pool, sleep_for, 0.3)
    assert out.value() == 0.3
    assert out.service_s is not None and out.service_s >= 0.3  # it slept that long, at least
    assert out.calls == 1


def test_thread_mode_result_and_service_time(pool: WorkerPool) -> None:
    _, out = submit(pool, sleep_for, 0.2, mode="thread")
    assert out.value() == 0.2
    assert out.service_s is not None and out.service_s >= 0.2


def test_raised_task_sends_exception_frames_and_service_time(pool: WorkerPool) -> None:
    _, out = submit(pool, boom, "nope")
    out.wait()
    assert out.ok is False and out.err is None and out.frames
    assert bytes(out.frames[0]).decode().endswith("ValueError")
    assert "nope" in bytes(out.frames[1]).decode()
    assert out.service_s is not None
    assert any("nope" in why for _, _, _, why in pool.recent_failures)


def test_large_buffers_cross_both_ways(pool: WorkerPool) -> None:
    arr = np.arange(4 << 20, dtype=np.int64)  # 32 MiB, out of band
    _, out = submit(pool, double, arr)
    got = out.value(120)
    assert got.shape == arr.shape and int(got[-1]) == 2 * int(arr[-1])


def test_output_is_attributed_to_the_task(pool: WorkerPool) -> None:
    _, out = submit(pool, chatty, 3)
    assert out.value() == 3
    text = "".join(t for fd, t in out.output if fd == 1)
    assert text == "line 0\nline 1\nline 2\n"


def test_module_requests_go_to_the_tasks_client(pool: WorkerPool) -> None:
    asked: list[str] = []

    def on_module(name: str, answer: Callable[[Any], None]) -> None:
        asked.append(name)
        # answered later, from another thread: the pool's reader must not wait for it
        threading.Timer(0.1, answer, args=(("none", name),)).start()

    out = Outcome()
    task = Task("path", "no_such_module_onepath:f", dumps(((), {}), "arguments"),
                out.on_done, owner="c1", on_module=on_module, label="import",
                options={"fwd": ("token-1", 1)})
    pool.submit(task)
    out.wait()
    assert asked and asked[0] == "no_such_module_onepath"
    assert out.ok is False and out.frames
    text = bytes(out.frames[1]).decode()
    assert "ModuleNotFoundError" in text and "no_such_module_onepath" in text, text
    assert submit(pool, add, 1, 2)[1].value() == 3


# -- stopping tasks ------------------------------------------------------------------------


def test_timeout_kills_the_worker_and_the_next_task_runs(pool: WorkerPool) -> None:
    before = pool.stats()["worker_pids"]
    _, out = submit(pool, sleep_for, 30, timeout=0.3)
    out.wait()
    assert isinstance(out.err, TaskTimeoutError) and out.service_s is None
    assert submit(pool, add, 1, 1)[1].value() == 2
    assert pool.stats()["worker_pids"] != before
    assert pool.stats()["worker_restarts"] == 1


def test_cancel_running_and_queued(pool: WorkerPool, tmp_path: Any) -> None:
    gate = str(tmp_path / "gate")
    running_id, running = submit(pool, wait_for_file, gate)
    queued_id, queued = submit(pool, add, 1, 2)
    wait_until("the first task to start", lambda: os.path.exists(gate + ".started"))
    assert pool.stats()["tasks_queued"] == 1 and pool.stats()["tasks_running"] == 1
    assert [t["task"] for t in pool.running_tasks()] == ["wait_for_file"]
    assert pool.cancel(queued_id)
    queued.wait()
    assert isinstance(queued.err, TaskCancelledError)
    assert pool.cancel(running_id)
    running.wait()
    assert isinstance(running.err, TaskCancelledError)
    assert not pool.cancel(running_id)  # finished: nothing to cancel
    assert submit(pool, add, 2, 2)[1].value() == 4


def test_cancel_after_the_result_is_refused(pool: WorkerPool) -> None:
    task_id, out = submit(pool, add, 1, 2)
    assert out.value() == 3
    assert not pool.cancel(task_id)
    assert submit(pool, add, 3, 3)[1].value() == 6


def test_crash_fails_only_its_task(pool: WorkerPool) -> None:
    _, crashed = submit(pool, die, 7)
    _, after = submit(pool, add, 4, 5)  # queued behind it: runs on the replacement
    crashed.wait()
    assert isinstance(crashed.err, WorkerCrashedError) and "exit code 7" in str(crashed.err)
    assert crashed.service_s is None
    assert after.value() == 9


def test_thread_mode_timeout(pool: WorkerPool) -> None:
    _, out = submit(pool, sleep_for, 5, mode="thread", timeout=0.2)
    out.wait()
    assert isinstance(out.err, TaskTimeoutError) and "thread-mode" in str(out.err)


# -- scheduling ----------------------------------------------------------------------------


def test_fair_share_between_owners(pool: WorkerPool, tmp_path: Any) -> None:
    gate = str(tmp_path / "gate")
    _, first = submit(pool, wait_for_file, gate, owner="a")
    wait_until("the first task to start", lambda: os.path.exists(gate + ".started"))
    order: list[str] = []  # owners in the order their tasks finished (one worker)
    outs = []
    for owner, n in (("a", 4), ("b", 1)):
        for i in range(n):
            _, out = submit(pool, add, i, 0, owner=owner)
            out.note = (order, owner)
            outs.append(out)
    open(gate, "w").close()
    first.value()
    for out in outs:
        out.wait()
    # round robin: b's only task is not behind all of a's queue
    assert order == ["a", "b", "a", "a", "a"]


def test_tasks_run_one_at_a_time_per_process_worker() -> None:
    p = WorkerPool(2, threads=0)
    p.start()
    try:
        outs = [submit(p, whose_pid)[1] for _ in range(20)]
        pids = {o.value() for o in outs}
        assert pids <= set(p.stats()["worker_pids"])
        st = p.stats()
        assert st["tasks_done"] == 20 and st["tasks_failed"] == 0
        hist, total = p.durations()
        assert sum(hist.values()) == 20 and total > 0
    finally:
        p.close(grace=0)


# -- shutdown ------------------------------------------------------------------------------


def test_close_refuses_queued_and_lets_running_finish(tmp_path: Any) -> None:
    p = WorkerPool(1, threads=0)
    p.start()
    gate = str(tmp_path / "gate")
    _, running = submit(p, wait_for_file, gate)
    _, queued = submit(p, add, 1, 1)
    wait_until("the first task to start", lambda: os.path.exists(gate + ".started"))
    pids = p.stats()["worker_pids"]
    closer = threading.Thread(target=p.close, kwargs={"grace": 60})
    closer.start()
    try:
        queued.wait()
        assert isinstance(queued.err, ServerDrainingError)
        with pytest.raises(ServerDrainingError):
            submit(p, add, 2, 2)
        open(gate, "w").close()
        assert running.value() == gate
    finally:
        closer.join(timeout=60)
    assert not closer.is_alive()
    for pid in pids:
        wait_until(f"worker {pid} to exit", lambda pid=pid: not psutil.pid_exists(pid)
                   or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
