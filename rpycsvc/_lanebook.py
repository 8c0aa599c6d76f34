"""The pool's books of lanes: which worker serves which client's lane, what runs there.

A lane (:mod:`rpycsvc.lane`) is a client socket the server hands to one of its process
workers, so the client's tasks reach the worker without passing through the server. The
pool still owns every worker's time, so it keeps books of them here: :class:`LaneBook` is
a part of :class:`~rpycsvc.pool.WorkerPool` (a mixin, sharing its lock and state), split
out because it is one concept. What it tracks:

* which worker serves which lane (``attach_lane``), and moving a lane to an idle worker
  when its worker is busy (``_move_lane``);
* lane tasks the worker announced (a timeout, or running past 50 ms): booked as running
  tasks, so timeouts, cancels, ``top`` and stats see them (``_on_lane_start``/``_end``);
* lane tasks it did not announce, read from its shared memory (:mod:`rpycsvc._shared`);
* each lane's *fate* when it breaks: what its client's task came to (``lane_fate``).
"""

from __future__ import annotations

import heapq
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._shared import DURATION_BUCKETS, FINISHED, RUNNING
from .errors import ConfigError, ServerDrainingError, TaskError

if TYPE_CHECKING:
    from .pool import Task, _WorkerHandle

#: How often (seconds) a task waiting behind a lane task looks whether it has started.
_WAIT_POLL = 0.01
#: How a lane failed its client: (error name, text, key of the task it concerns or None).
Fate = tuple[Any, ...]
#: The fate of a lane closed between tasks: its client's task never reached a worker.
_LANE_CLOSED = ("LaneClosed", "the lane closed before its worker read a task from it", None)
#: ...and of one whose task ran, but whose result could not be sent (the client can't
#: know if it had effects: never re-run it)
_REPLY_LOST = ("LaneReplyLost", "the task ran, but its result could not be sent back "
               "(the worker died, or the client did not read for too long)")


def _reply_lost(key: Any) -> Fate:
    return (*_REPLY_LOST, key)

def _empty_counts() -> dict[str, Any]:
    return {"done": 0, "failed": 0, "bytes_in": 0, "bytes_out": 0, "duration_sum": 0.0,
            "buckets": dict.fromkeys(DURATION_BUCKETS, 0)}


@dataclass(eq=False)
class _Lane:
    """A client's lane to one worker, as the pool books it."""

    id: str
    worker: _WorkerHandle
    owner: Hashable
    client: str
    no: int  # what the worker writes in its shared state while it runs a task of this lane
    restricted: bool = False  # service-only mode: the worker accepts endpoint calls only
    task: Task | None = None  # the lane task the worker told us of, while it runs
    cancel: tuple[int | None, str] | None = None  # (key, reason) of a cancel asked for
    # before that task started


class LaneBook:
    """The lane part of :class:`~rpycsvc.pool.WorkerPool` (see the module docstring)."""

    # The pool's state this part uses (set up in WorkerPool.__init__).
    _lock: threading.Lock
    _fate_cv: threading.Condition
    _deadline_cv: threading.Condition
    _lanes: dict[str, _Lane]
    _lane_fates: OrderedDict[str, Fate]
    _lane_poll: bool
    _harvested: dict[str, Any]
    _workers: list[_WorkerHandle]
    _idle: deque[_WorkerHandle]
    _tasks: dict[int, Task]
    _turns: deque[Hashable]
    _deadlines: list[tuple[float, int]]
    _ids: Any
    _closing: bool
    start_timeout: float
    duration_buckets: dict[float, int]
    duration_sum: float

    if TYPE_CHECKING:
        def cancel(self, task_id: int, reason: str = "cancel") -> bool: ...
        def _start_locked(self, task: Task, worker: _WorkerHandle,
                          started: float | None = None) -> None: ...
        def _next_process_task_locked(self, worker: _WorkerHandle | None) -> Task | None: ...
        def _send_task(self, worker: _WorkerHandle, task: Task) -> None: ...
        def _finish(self, task: Task, ok: bool, frames: list[Any] | None,
                    err: TaskError | None, counted: bool = False) -> None: ...
        @staticmethod
        def _kill(w: _WorkerHandle) -> None: ...

    def _poll_lane_busy_locked(self) -> list[tuple[_WorkerHandle, Task]]:
        """Queued tasks for idle workers whose lane task has ended since we last looked."""
        todo = []
        waiting = False
        for w in list(self._idle):
            if w.running_lane()[0]:
                waiting = True
            elif self._turns:
                task = self._next_process_task_locked(w)
                if task is not None:
                    todo.append((w, task))
        self._lane_poll = waiting and bool(self._turns)
        return todo

    def _behind_lane_task_locked(self, task: Task, now: float) -> bool:
        """True if ``task``'s time has not run out after all: its worker was busy with a
        lane task that came first, so it has not started (or started just now); or it is
        a lane task that finished in time and is sending its reply."""
        w = task.worker
        if w is None or w.role != "process" or task.timeout is None:
            return False
        if task.kind == "lane":
            number, _, _, finished, _ = w.running_lane()
            if finished == FINISHED and number == task.options.get("lane_no"):
                heapq.heappush(self._deadlines, (now + _WAIT_POLL, task.task_id))
                return True
            return False
        if w.running_lane()[0]:  # the worker runs a lane task, so not this one: look again
            task.waiting = True
            heapq.heappush(self._deadlines, (now + _WAIT_POLL, task.task_id))
            return True
        if task.waiting:  # the lane task ended since we looked: this one starts about now
            task.waiting = False
            task.started = now
            heapq.heappush(self._deadlines, (now + task.timeout, task.task_id))
            return True
        return False

    # -- lanes ---------------------------------------------------------------------------------
    def attach_lane(self, fd: int, lane_id: str, *, owner: Hashable, client: str,
                    restricted: bool) -> None:
        """Hand a client's connected socket ``fd`` to the process worker with the fewest
        lanes. The caller closes its ``fd`` afterwards (the worker has its own copy)."""
        deadline = time.monotonic() + self.start_timeout
        while True:  # bounded: a replacement worker may still be starting
            with self._lock:
                if self._closing:
                    raise ServerDrainingError("the server is shutting down: it takes no new "
                                              "lanes (tasks can be sent to another server)")
                if lane_id in self._lanes:
                    raise ConfigError(f"lane {lane_id} is already attached")
                ready = [w for w in self._workers
                         if w.alive and w.ready.is_set() and not w.stopping]
                if ready:
                    # an idle worker first: a busy one takes the lane only when it is done
                    w = min(ready, key=lambda x: (x not in self._idle or bool(x.running_lane()[0]),
                                                  len(x.lanes)))
                    self._lane_fates.pop(lane_id, None)
                    w.lanes.add(lane_id)
                    lane = _Lane(lane_id, w, owner, client, next(self._ids), restricted)
                    self._lanes[lane_id] = lane
                    break
            if time.monotonic() > deadline:
                raise ConfigError("no worker process became ready to take the lane")
            time.sleep(0.005)
        try:
            w.send(("lane", lane_id, restricted, lane.no), fds=(fd,))
        except OSError:
            with self._lock:
                self._drop_lane_locked(lane_id, None)
            raise

    def _lane_task_locked(self, lane: _Lane, label: str, timeout: float | None,
                          started: float, key: int = 0) -> Task:
        lane_id = lane.id

        def on_done(task: Task, ok: bool, frames: Any, err: TaskError | None) -> None:
            if err is not None:
                with self._lock:
                    self._set_fate_locked(lane_id, (type(err).__name__, str(err),
                                                    task.options.get("key")))

        from .pool import Task  # (pool imports this module)

        task = Task(kind="lane", spec=None, frames=(), on_done=on_done, owner=lane.owner,
                    timeout=timeout, label=label, client=lane.client,
                    task_id=next(self._ids), state="running", started=started,
                    options={"key": key, "lane_no": lane.no})
        self._tasks[task.task_id] = task
        return task

    def _on_lane_start(self, w: _WorkerHandle, lane_id: str, label: str,
                       timeout: float | None, started: float, key: int) -> None:
        """The worker runs lane task ``key``: book it as running there (``started`` is the
        worker's ``time.monotonic()``, the same clock as ours)."""
        with self._lock:
            lane = self._lanes.get(lane_id)
            if lane is None or self._closing or lane.task is not None:
                return  # (booked already if a cancel found it running)
            task = self._book_lane_task_locked(lane, label, timeout, started, key)
            pending, lane.cancel = lane.cancel, None
        if pending is not None and pending[0] in (key, None):
            self.cancel(task.task_id, pending[1])

    def _book_lane_task_locked(self, lane: _Lane, label: str, timeout: float | None,
                               started: float, key: int) -> Task:
        task = self._lane_task_locked(lane, label, timeout, started, key)
        self._start_locked(task, lane.worker, started)
        lane.task = task
        if lane.worker in self._idle:
            self._idle.remove(lane.worker)
        return task

    def _on_lane_end(self, w: _WorkerHandle, lane_id: str, ok: bool,
                     unannounced: tuple[str, float] | None, why: tuple[Any, ...] | None) -> None:
        """A lane task that we knew of, or that failed, ended. ``unannounced`` is ``(label,
        started)`` of one too short for the worker to have told us of its start; ``why``
        the failure's (type name, message). Counted already: in the worker's shared
        state."""
        nxt = None
        with self._lock:
            lane = self._lanes.get(lane_id)
            if lane is None:
                return
            task = lane.task
            if task is not None:
                lane.task = None
                w.tasks.pop(task.task_id, None)
                nxt = (self._next_process_task_locked(w)
                       if w.alive and not w.stopping and not w.tasks else None)
            elif unannounced is not None:
                task = self._lane_task_locked(lane, unannounced[0], None, unannounced[1])
            else:
                return
        if nxt is not None:
            self._send_task(w, nxt)
        self._finish(task, ok, list(why) if why else None, None, counted=True)

    def _lost_with_worker_locked(self, w: _WorkerHandle,
                                 running: tuple[int, str, float, int, int]) -> list[Task]:
        """The tasks that died with worker ``w``, given what its shared memory said it ran.

        A lane task that had finished (and been counted) is not among them: only its reply
        may be lost, and it must not run again. A lane task too short to have been
        announced is booked now, so that it is reported like the others."""
        number, label, started, phase, key = running
        done_lane = self._lane_of_no(w, number) if phase == FINISHED and number else ""
        if done_lane:
            self._set_fate_locked(done_lane, _reply_lost(key))
        lost = []
        for task in w.tasks.values():
            if done_lane and task.kind == "lane" and task.options.get("lane_no") == number:
                self._tasks.pop(task.task_id, None)
            else:
                lost.append(task)
        for lane_id in w.lanes:
            lane = self._lanes[lane_id]
            if lane.task is None and lane.no == number and phase == RUNNING:
                lane.task = self._lane_task_locked(lane, label, None, started, key)
                if lane.cancel is not None and lane.cancel[0] in (key, None):
                    lane.task.ending = lane.cancel[1]  # we killed it: reported as such
                lost.append(lane.task)
        return lost

    def _move_lane(self, old: _WorkerHandle, lane_id: str, fd: int) -> None:
        """``old`` is busy and handed back a lane whose client waits: give it to an idle
        worker (back to ``old`` if none is idle; it serves the lane when it can)."""
        try:
            with self._lock:
                lane = self._lanes.get(lane_id)
                if lane is None:
                    return
                idle = [w for w in self._idle if w is not old and w.alive
                        and not w.running_lane()[0]]
                new = min(idle, key=lambda w: len(w.lanes)) if idle else old
                old.lanes.discard(lane_id)
                new.lanes.add(lane_id)
                lane.worker = new
            try:
                new.send(("lane", lane_id, lane.restricted, lane.no), fds=(fd,))
            except OSError:
                with self._lock:
                    self._drop_lane_locked(lane_id, _LANE_CLOSED)
        finally:
            os.close(fd)

    def _lane_of_no(self, w: _WorkerHandle, number: int) -> str:
        """The id of ``w``'s lane numbered ``number`` ("" if none)."""
        return next((i for i in w.lanes if i in self._lanes and self._lanes[i].no == number),
                    "")

    def _drop_lane_locked(self, lane_id: str, fate: Fate | None) -> None:
        lane = self._lanes.pop(lane_id, None)
        if lane is not None:
            lane.worker.lanes.discard(lane_id)
        if fate is not None and lane_id not in self._lane_fates:
            self._set_fate_locked(lane_id, fate)
        self._fate_cv.notify_all()

    def _set_fate_locked(self, lane_id: str, fate: Fate) -> None:
        self._lane_fates[lane_id] = fate
        while len(self._lane_fates) > 1000:
            self._lane_fates.popitem(last=False)
        self._fate_cv.notify_all()

    def lane_fate(self, lane_id: str, timeout: float = 5.0) -> Fate | None:
        """Why ``lane_id`` failed its client: ``(error name, text, task key)``, waiting up to
        ``timeout`` seconds for the pool to learn it. ``("LaneClosed", ...)`` means no task
        of it was running: the client may send its task another way. None: still open."""
        with self._lock:
            self._fate_cv.wait_for(
                lambda: lane_id in self._lane_fates or lane_id not in self._lanes
                or (self._lanes[lane_id].task is None and not self._lanes[lane_id].worker.alive),
                timeout)
            fate = self._lane_fates.get(lane_id)
            if fate is None and lane_id not in self._lanes:
                fate = _LANE_CLOSED
            return fate

    def cancel_lane(self, lane_id: str, owner: Hashable, key: int | None = None,
                    reason: str = "cancel") -> bool:
        """Stop task ``key`` (None: whichever) of ``owner``'s lane ``lane_id``, by killing
        its worker. One not started yet (still unread in the lane) is refused by the worker
        when it reads it, or stopped when it starts; one that ended already is left alone.
        With ``key`` None, a lane running nothing is closed (its owner is gone)."""
        with self._lock:
            lane = self._lanes.get(lane_id)
            if lane is None or lane.owner != owner:
                return False
            task = lane.task
            worker = lane.worker
            if task is None:
                number, _, _, phase, running_key = worker.running_lane()
                lane.cancel = (key, reason)
                if number == lane.no and phase == RUNNING and key in (None, running_key):
                    # Running, unannounced: no lane-end will come for it, so it is not
                    # booked here; the worker dies, and what died with it is booked then,
                    # as cancelled (see _lost_with_worker_locked).
                    lane.cancel = (running_key, reason)
                    worker.stopping = reason
                    self._kill(worker)
                    return True
            elif key not in (None, task.options.get("key")):
                return False
        if task is None:
            try:
                worker.send(("lane-drop", lane_id) if key is None
                            else ("lane-cancel", lane_id, key))
            except OSError:
                pass
            return True
        return self.cancel(task.task_id, reason)

    def drop_owner_lanes(self, owner: Hashable) -> None:
        """``owner`` is gone: stop what its lanes run, close the others."""
        with self._lock:
            lanes = [lane.id for lane in self._lanes.values() if lane.owner == owner]
        for lane_id in lanes:
            self.cancel_lane(lane_id, owner)

    # -- counts, from the workers' shared memory ------------------------------------------------
    def _unannounced_locked(self) -> list[tuple[_Lane, str, float]]:
        """Lane tasks running now that their workers have not told us of yet (too young):
        ``(lane, label, started)``, read from the workers' shared memory."""
        found = []
        for w in self._workers:
            if w.lanes:
                number, label, started, finished, _ = w.running_lane()
                for lane_id in w.lanes:
                    lane = self._lanes[lane_id]
                    if number and finished == RUNNING and lane.no == number \
                            and lane.task is None:
                        found.append((lane, label, started))
        return found

    @staticmethod
    def _add_counts_locked(into: dict[str, Any], counts: dict[str, Any]) -> None:
        for key, value in counts.items():
            if key == "buckets":
                for bound, n in value.items():
                    into["buckets"][bound] += n
            else:
                into[key] += value

    def lane_counts(self) -> dict[str, Any]:
        """Totals of every lane task finished here (done, failed, bytes, durations)."""
        with self._lock:
            total = _empty_counts()
            self._add_counts_locked(total, self._harvested)
            for w in self._workers:
                if w.state is not None:
                    self._add_counts_locked(total, w.state.counts())
            return total

    def durations(self) -> tuple[dict[float, int], float]:
        """The task-duration histogram (bucket upper bound → count) and sum of seconds."""
        lanes = self.lane_counts()
        with self._lock:
            buckets = {b: n + lanes["buckets"][b] for b, n in self.duration_buckets.items()}
            return buckets, self.duration_sum + lanes["duration_sum"]
