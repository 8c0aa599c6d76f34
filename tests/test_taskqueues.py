"""The pool's queues (rpycsvc.server.taskqueues): clients take turns, a held client's tasks
wait whatever their mode, and nothing queued is lost or taken twice. Pure logic: no
processes (the pool's behaviour with real workers is in test_pool_reliability and
test_hardening_stall)."""

from __future__ import annotations

from typing import Any

from rpycsvc.server.task import Task
from rpycsvc.server.taskqueues import TaskQueues


def task(owner: str, n: int, mode: str = "process") -> Task:
    return Task(kind="pickled", spec=None, frames=(), on_done=lambda *a: None, owner=owner,
                mode=mode, label=f"{owner}{n}")


def drain(take: Any) -> list[str]:
    out = []
    while (t := take()) is not None:
        out.append(t.label)
    return out


def test_clients_take_turns_and_each_task_goes_once() -> None:
    q = TaskQueues()
    for t in [task("a", i) for i in range(3)] + [task("b", 0)]:
        q.put(t)
    assert len(q) == 4
    assert drain(q.next_process) == ["a0", "b0", "a1", "a2"]
    assert len(q) == 0 and q.next_process() is None


def test_a_held_client_waits_in_both_modes_and_goes_on_when_released() -> None:
    q = TaskQueues()
    for t in (task("a", 0), task("b", 0), task("a", 1, "thread"), task("b", 1, "thread")):
        q.put(t)
    q.hold("a")
    assert q.held == 1
    assert drain(q.next_process) == ["b0"]
    assert q.has_thread_task()
    assert drain(q.next_thread) == ["b1"]
    assert not q.has_thread_task() and len(q) == 2  # a's wait, counted as queued
    q.release("a")
    assert q.held == 0
    assert drain(q.next_process) == ["a0"] and drain(q.next_thread) == ["a1"]


def test_remove_and_take_all() -> None:
    q = TaskQueues()
    kept, cancelled = task("a", 0), task("a", 1)
    for t in (kept, cancelled, task("b", 0, "thread")):
        q.put(t)
    q.remove(cancelled)
    q.remove(cancelled)  # (twice: a no-op)
    q.hold("b")
    assert sorted(t.label for t in q.take_all()) == ["a0", "b0"]
    assert len(q) == 0 and q.held == 0
