"""The server's worker pool: process workers for CPU-bound tasks, a thread worker for I/O.

Tasks wait in :class:`~rpycsvc.server.taskqueues.TaskQueues` (per client, taken in turns).
A process worker runs one task at a time; a task past its timeout, or cancelled while
running, is stopped by killing its worker, which is then replaced. Each worker leads its
own process group, so the kill takes every process the task started with it (one that made
itself a new session escapes). A worker that dies by itself
(``os._exit``, a signal, the kernel's OOM killer) fails only the task it was running; its
death is seen by a thread waiting for the process, not by the end of its channel (a child
the task forked may hold that open). Thread-mode tasks share one worker process with many
threads; they are stopped by an exception raised in their thread, which takes effect only
when the thread next runs Python code.

A task's timeout is kept by :class:`~rpycsvc.server.deadlines.Deadlines`, which stops it
as a cancel does; time the server was frozen (SIGSTOP, a paused VM) does not count. Starting,
reading and killing worker processes is :mod:`rpycsvc.server.workerprocess`.

On :meth:`WorkerPool.close` (a graceful shutdown), queued tasks and tasks submitted
meanwhile fail with :class:`~rpycsvc.errors.ServerDrainingError` (they never ran: a cluster
sends them elsewhere); running tasks have ``grace`` seconds to finish, and those cut off fail
with :class:`~rpycsvc.errors.ServerLostError` (they may have had effects: re-run only per
the client's ``retries``).

The pool is the only scheduler: a worker runs only what the pool sent it, one task at a
time for a process worker (up to ``threads`` at once for the thread worker), so the pool's
own books say exactly what runs where, and stopping a task by killing its worker stops
nothing else. A worker measures how long it spent on each task (from reading it to its
result pickled) and says so with the result: :attr:`Task.service_s`.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import threading
import time
from collections import deque
from collections.abc import Hashable
from typing import Any

from rpycsvc.errors import (
    ConfigError,
    ServerDrainingError,
    ServerLostError,
    TaskError,
    WorkerCrashedError,
)
from rpycsvc.server.deadlines import Deadlines
from rpycsvc.server.task import Task, _WorkerHandle
from rpycsvc.server.taskqueues import TaskQueues
from rpycsvc.server.workerprocess import _describe_exit, _kill_tree, spawn_worker, watch_worker

log = logging.getLogger("rpycsvc.pool")

#: Upper bounds (seconds) of the task-duration histogram; the last catches everything.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, float("inf"))


class WorkerPool:
    """A fixed number of process workers plus one lazily started thread worker."""

    def __init__(
        self,
        workers: int,
        *,
        threads: int = 256,
        endpoints: list[str] | None = None,
        memory_limit: int = 0,
        start_timeout: float = 30.0,
    ) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers!r}")
        self.size = workers
        self.threads = threads
        self.endpoint_modules = list(endpoints or [])
        self.endpoint_names: list[str] = []
        self.memory_limit = memory_limit
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._workers: list[_WorkerHandle] = []
        self._idle: deque[_WorkerHandle] = deque()
        self._queued = TaskQueues()
        self._thread_worker: _WorkerHandle | None = None
        self._tasks: dict[int, Task] = {}
        self._deadlines = Deadlines(self._lock)
        self._settled_cv = threading.Condition(self._lock)  # a task finished (for close)
        self._finishing = 0  # tasks taken off the books whose on_done is still running
        self._closing = False
        self._started = False
        self._start_lock = threading.Lock()
        self.counters = {"done": 0, "failed": 0, "restarts": 0}
        #: task durations (seconds, from start to finish) by histogram bucket upper bound
        self.duration_buckets: dict[float, int] = dict.fromkeys(DURATION_BUCKETS, 0)
        self.duration_sum = 0.0
        #: the last few failures: (time, label, client, error text)
        self.recent_failures: deque[tuple[float, str, str, str]] = deque(maxlen=20)

    # -- lifecycle ---------------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Start the workers unless started (a forked connection handler starts its own)."""
        with self._start_lock:
            if not self._started:
                self.start()

    def start(self) -> None:
        """Start every process worker and wait (bounded) until each is ready."""
        self._started = True
        handles = [self._spawn("process") for _ in range(self.size)]
        if self.threads:  # started now so the first thread-mode task doesn't wait for it
            with self._lock:
                handles.append(self._thread_worker_locked())
        deadline = time.monotonic() + self.start_timeout
        for h in handles:
            if not h.ready.wait(max(0.0, deadline - time.monotonic())) or not h.alive:
                self.close(grace=0)
                raise ConfigError(self._start_failure or "a worker process did not start in time")
        threading.Thread(target=self._deadline_loop, name="rpycsvc-deadlines", daemon=True).start()

    _start_failure = ""

    def close(self, grace: float = 10.0) -> None:
        """Stop taking tasks, let running ones finish for ``grace`` seconds, then stop workers.

        Queued tasks fail with :class:`ServerDrainingError` now (they never started); those
        still running when ``grace`` is over are killed, with their process trees, and fail
        with :class:`ServerLostError`."""
        with self._lock:
            self._closing = True
            queued = self._queued.take_all()
            self._deadlines.wake_locked()
        for t in queued:
            self._finish(t, False, None, ServerDrainingError(
                f"the server is shutting down: task {t.label or t.task_id} was queued and "
                "never started (it can be sent to another server)"))
        deadline = time.monotonic() + grace
        with self._lock:
            # Until every running task's result has been handed to its connection, not
            # merely taken off the books: the server closes connections right after this.
            while (self._tasks or self._finishing) and time.monotonic() < deadline:
                self._settled_cv.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            workers = list(self._workers) + ([self._thread_worker] if self._thread_worker else [])
        for w in workers:
            w.alive = False
            try:
                w.send(("exit",))
            except OSError:
                pass
        deadline = time.monotonic() + 1.0  # idle workers exit at once; busy ones are killed
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_tree(w.proc)
                w.proc.wait(timeout=5.0)
        for w in workers:  # each fails what it ran (bounded: a stuck callback can't hang us)
            if w.reader is not None and w.reader is not threading.current_thread():
                w.reader.join(timeout=max(1.0, deadline + 5.0 - time.monotonic()))
            _kill_tree(w.proc)  # whatever its tasks left running
            w.sock.close()

    # -- submitting --------------------------------------------------------------------------
    def submit(self, task: Task) -> int:
        """Queue ``task``; returns its id (for :meth:`cancel`). Never blocks on the task."""
        if task.mode not in ("process", "thread"):
            raise ConfigError(f"mode must be 'process' or 'thread', got {task.mode!r}")
        if task.mode == "thread" and self.threads < 1:
            raise ConfigError("this server runs no thread-mode tasks (started with --threads 0)")
        with self._lock:
            if self._closing:
                raise ServerDrainingError(
                    f"the server is shutting down: task {task.label or 'task'} was refused "
                    "(it can be sent to another server)")
            task.task_id = next(self._ids)
            task.state = "queued"
            self._tasks[task.task_id] = task
            self._queued.put(task)
            if task.mode == "thread":
                tw = self._thread_worker_locked()
                todo: list[Task | None] = list(self._take_thread_tasks_locked(tw))
                worker: _WorkerHandle | None = tw
            else:
                worker = self._idle.popleft() if self._idle else None
                todo = [self._next_process_task_locked(worker)] if worker else []
        for t in todo:
            if worker is not None and t is not None:
                self._send_task(worker, t)
        return task.task_id

    def cancel(self, task_id: int, reason: str = "cancel") -> bool:
        """Cancel a queued task, or stop a running one. False if it already finished."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.ending:
                return False
            if task.state == "running" and (task.worker is None
                                            or task.worker.tasks.get(task_id) is not task):
                # finished: its result is on its way (its worker may run the next task
                # already, which must not die for it)
                return False
            task.ending = reason
            if task.state == "queued":
                self._queued.remove(task)
                worker = None
            else:
                worker = task.worker
        err = task.ending_error()
        if worker is None:
            self._finish(task, False, None, err)
        elif worker.role == "process":
            worker.stopping = reason
            self._kill(worker)  # with its process group; its death fails the task
        else:
            try:
                worker.send(("cancel", task_id, reason))
            except OSError:
                pass
            self._finish(task, False, None, err)
        return True

    # -- scheduling (call with the lock held) -----------------------------------------------
    def _next_process_task_locked(self, worker: _WorkerHandle | None) -> Task | None:
        if worker is None:
            return None
        task = self._queued.next_process()
        if task is not None:
            self._start_locked(task, worker)
            return task
        self._idle.append(worker)
        return None

    def _take_thread_tasks_locked(self, tw: _WorkerHandle) -> list[Task]:
        todo = []
        while tw.ready.is_set() and len(tw.tasks) < self.threads:
            task = self._queued.next_thread()
            if task is None:
                break
            self._start_locked(task, tw)
            todo.append(task)
        return todo

    def hold(self, owner: Hashable) -> None:
        """Start no more of ``owner``'s tasks until :meth:`release` (a client that doesn't
        read its results: see TaskEndpoint); its running ones finish."""
        with self._lock:
            self._queued.hold(owner)

    def release(self, owner: Hashable) -> None:
        """Let ``owner``'s queued tasks go again (:meth:`dispatch` hands them out)."""
        with self._lock:
            self._queued.release(owner)

    def dispatch(self) -> None:
        """Give idle workers what may go now (after :meth:`release`)."""
        todo: list[tuple[_WorkerHandle, Task]] = []
        with self._lock:
            while self._idle:
                worker = self._idle.popleft()
                task = self._next_process_task_locked(worker)  # (re-idles it if none)
                if task is None:
                    break
                todo.append((worker, task))
            if self._queued.has_thread_task() and not self._closing:
                tw = self._thread_worker_locked()  # (started if it died meanwhile)
                todo.extend((tw, t) for t in self._take_thread_tasks_locked(tw))
        for worker, task in todo:
            self._send_task(worker, task)

    def _start_locked(self, task: Task, worker: _WorkerHandle) -> None:
        task.state = "running"
        task.worker = worker
        task.started = time.monotonic()
        worker.tasks[task.task_id] = task
        if task.timeout is not None:
            self._deadlines.add_locked(task.started + task.timeout, task.task_id)

    def _running_locked(self, task_id: int) -> bool:
        task = self._tasks.get(task_id)
        return task is not None and task.state == "running"

    def _thread_worker_locked(self) -> _WorkerHandle:
        if self._thread_worker is None or not self._thread_worker.alive:
            self._thread_worker = self._spawn("thread")
        return self._thread_worker

    def _send_task(self, worker: _WorkerHandle, task: Task) -> None:
        try:
            if task.forwarded:  # the client's run message as it came (see Task.forwarded)
                worker.send(("run-inline", task.task_id), task.frames)
            else:
                worker.send(("run", task.task_id, task.kind, task.spec, task.options),
                            task.frames)
        except OSError:
            self._kill(worker)  # its reader thread fails the task and replaces the worker

    # -- workers -----------------------------------------------------------------------------
    def _spawn(self, role: str) -> _WorkerHandle:
        handle = spawn_worker(role, threads=self.threads, endpoints=self.endpoint_modules,
                              memory_limit=self.memory_limit)
        if role == "process":  # never called with the lock held for this role
            with self._lock:
                self._workers.append(handle)
        watch_worker(handle, self)  # its reader thread calls the on_* methods below
        return handle

    def on_worker_ready(self, w: _WorkerHandle, control: tuple[Any, ...]) -> None:
        _, _pid, names, error = control
        if error:
            self._start_failure = error
            w.alive = False
            w.ready.set()
            self._kill(w)
            return
        self.endpoint_names = list(names)
        todo: list[Task | None]
        with self._lock:
            w.ready.set()
            if w.role == "process":
                todo = [self._next_process_task_locked(w)]
            else:
                todo = list(self._take_thread_tasks_locked(w))
        for t in todo:
            if t is not None:
                self._send_task(w, t)

    def on_task_done(self, w: _WorkerHandle, task_id: int, ok: bool, service_s: float | None,
                     frames: list[Any], framed: int | None = None) -> None:
        """``framed``: ``frames`` is the client's whole message, framed by the worker, with
        a result of this many bytes (see ``Task.framed``)."""
        nxt: list[Task | None]
        with self._lock:
            task = w.tasks.pop(task_id, None)
            if task is not None:
                task.service_s = service_s
                task.framed = framed
            if w.role == "process":
                # a worker we are killing must not be handed the next task
                nxt = ([self._next_process_task_locked(w)]
                       if w.alive and not w.stopping and not w.tasks else [])
            else:
                nxt = list(self._take_thread_tasks_locked(w))
        for t in nxt:
            if t is not None:
                self._send_task(w, t)
        if task is not None:
            self._finish(task, ok, frames, None)

    def on_worker_exit(self, w: _WorkerHandle) -> None:
        code = w.proc.poll()
        if code is None:
            try:
                code = w.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self._kill(w)
                code = w.proc.wait(timeout=5.0)
        with self._lock:
            was_alive, w.alive = w.alive, False
            # Every task it had was sent to it, so it ran (or was about to): it is lost.
            lost = list(w.tasks.values())
            w.tasks.clear()
            if w in self._idle:
                self._idle.remove(w)
            if w in self._workers:
                self._workers.remove(w)
            replace = was_alive and not self._closing
            if replace:
                self.counters["restarts"] += 1
        _kill_tree(w.proc)  # whatever the worker's tasks left behind dies with it
        w.sock.close()
        w.ready.set()
        how = _describe_exit(code)
        for task in lost:
            err: TaskError | ServerLostError
            if task.ending:
                err = task.ending_error()
            elif self._closing:
                err = ServerLostError(
                    f"the server shut down while the task ran: task {task.label or task.task_id}"
                    " did not finish within the shutdown's grace period and was stopped (it "
                    "may have had effects; it is re-run elsewhere only as retries allow)")
            else:
                err = WorkerCrashedError(
                    f"the worker process running task {task.label or task.task_id} died "
                    f"({how}); the task may have called os._exit(), crashed the interpreter, "
                    "or run out of memory. The worker was replaced.")
            self._finish(task, False, None, err)
        if replace:
            if w.stopping:
                log.info("worker %s stopped to end a task (%s); starting a replacement",
                         w.proc.pid, w.stopping)
            else:
                log.warning("worker %s exited (%s); starting a replacement", w.proc.pid, how)
            if w.role == "process":
                self._spawn("process")
            else:
                with self._lock:
                    if self._queued.thread_tasks():  # (held ones too: for their release)
                        self._thread_worker_locked()  # it takes the queue when ready

    @staticmethod
    def _kill(w: _WorkerHandle) -> None:
        """Kill the worker and every process its tasks started (its process group)."""
        _kill_tree(w.proc)

    # -- completion and deadlines ------------------------------------------------------------
    def _finish(self, task: Task, ok: bool, frames: list[Any] | None,
                err: TaskError | ServerLostError | None) -> None:
        """Book ``task`` as finished and hand its result to ``on_done``. (``err`` is a
        ServerLostError only for a task cut off by shutdown; callbacks use just its type's
        name and its text.)"""
        with self._lock:
            if self._tasks.pop(task.task_id, None) is None:
                return  # already finished (e.g. a thread task that timed out, then returned)
            task.state = "done"
            if task.timeout is not None:
                self._deadlines.prune_locked(self._running_locked, len(self._tasks))
            self.counters["done" if ok else "failed"] += 1
            if task.started:
                took = time.monotonic() - task.started
                self.duration_sum += took
                for bound in DURATION_BUCKETS:
                    if took <= bound:
                        self.duration_buckets[bound] += 1
                        break
            if not ok:
                if err is not None:
                    why = str(err)
                elif frames and len(frames) >= 2:  # (type name, message, ...): no unpickling
                    why = f"{bytes(frames[0]).decode(errors='replace')}: " \
                          f"{bytes(frames[1]).decode(errors='replace')}"
                else:
                    why = "raised an exception"
                self.recent_failures.append((time.time(), task.label, task.client, why[:200]))
                log.info("task %s from %s failed after %.3f s: %s", task.label, task.client,
                         time.monotonic() - task.started if task.started else 0.0, why[:200])
            self._finishing += 1
        try:
            task.on_done(task, ok, frames, err)  # type: ignore[arg-type]  # (see above)
        except Exception:
            log.exception("task completion callback failed")
        finally:
            with self._lock:
                self._finishing -= 1
                self._settled_cv.notify_all()

    def _deadline_loop(self) -> None:
        """The deadline thread: a running task past its timeout is stopped as a cancel does."""
        self._deadlines.run(closing=lambda: self._closing, due=self._due_locked,
                            expire=lambda task_id: self.cancel(task_id, "timeout"))

    def _due_locked(self, task_id: int) -> bool:
        """Whether task ``task_id``, whose deadline passed, still runs unstopped."""
        task = self._tasks.get(task_id)
        return task is not None and task.state == "running" and not task.ending

    # -- introspection ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            running = sum(1 for t in self._tasks.values() if t.state == "running")
            queued = len(self._queued)
            pids = [w.proc.pid for w in self._workers]
            tw = self._thread_worker
            return {
                "workers": self.size,
                "worker_pids": pids,  # the process workers: as many as "workers"
                "thread_worker_pid": tw.proc.pid if tw is not None and tw.alive else None,
                "threads": self.threads,
                "tasks_running": running,
                "tasks_queued": queued,
                # connections whose tasks wait because their client doesn't read its results
                "clients_not_reading": self._queued.held,
                "tasks_done": self.counters["done"],
                "tasks_failed": self.counters["failed"],
                "worker_restarts": self.counters["restarts"],
                # timeouts being watched: running tasks' (and finished ones' not yet pruned;
                # bounded by max(64, twice the live tasks))
                "timeouts_pending": len(self._deadlines),
            }

    def running_tasks(self) -> list[dict[str, Any]]:
        """What runs now: label, client, mode and seconds elapsed (for ``rpycsvc top``)."""
        now = time.monotonic()
        with self._lock:
            return [
                {"task": t.label, "client": t.client, "mode": t.mode,
                 "elapsed": round(now - t.started, 3)}
                for t in self._tasks.values() if t.state == "running"
            ]

    def durations(self) -> tuple[dict[float, int], float]:
        """The task-duration histogram (bucket upper bound → count) and sum of seconds."""
        with self._lock:
            return dict(self.duration_buckets), self.duration_sum



