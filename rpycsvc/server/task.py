"""What the worker pool books: a task (:class:`Task`) and the worker process it runs on.

:class:`_WorkerHandle` is the pool's handle of a worker process, and the tasks sent to it.

The server's connections (:mod:`rpycsvc.server.taskserver`, :mod:`rpycsvc.server.service`)
make a :class:`Task` and submit it to :class:`~rpycsvc.server.pool.WorkerPool`; its payload
frames are opaque here, never unpickled.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Callable

from rpycsvc.errors import TaskCancelledError, TaskError, TaskTimeoutError
from rpycsvc.server import wire as _wire

#: on_done(task, ok, frames, error): ok → result frames; not ok with frames → the task
#: raised (exception frames); error → the pool stopped or lost the task.
DoneCallback = Callable[["Task", bool, "list[Any] | None", "TaskError | None"], None]


@dataclass(eq=False)
class Task:
    """One unit of work, as the pool sees it (opaque payload frames, never unpickled here)."""

    kind: str  # "pickled" | "path" | "endpoint"
    spec: Any
    frames: tuple[Any, ...]
    on_done: DoneCallback
    owner: Hashable = None
    mode: str = "process"
    timeout: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    on_output: Callable[[int, Any], None] | None = None  # fd 1/2 text, or 0: log record bytes
    label: str = ""
    client: str = ""
    task_id: int = 0
    state: str = "new"
    started: float = 0.0
    ending: str = ""
    worker: _WorkerHandle | None = None
    #: seconds the worker spent on the task, from reading it to its result pickled (set
    #: before ``on_done`` runs; None if the worker never reported: timeout, cancel, crash)
    service_s: float | None = None
    #: set (with ``on_done``'s frames ``[message]``) when the worker framed the client's
    #: whole ``done`` message itself: the size of the result it carries (for the limit)
    framed: int | None = None
    #: ``frames`` is the client's whole inline ``run`` block, sent to the worker as it came
    #: (``("run-inline", task_id)``; the worker unpacks it)
    forwarded: bool = False
    #: on_module(name, answer): ask the task's client for module ``name`` and call
    #: ``answer(reply)`` once it comes (see rpycsvc.protocol.forwarding); None: nobody to ask
    on_module: Callable[[str, Callable[[Any], None]], None] | None = None

    def ending_error(self) -> TaskError:
        """The error of a task stopped by its timeout or a cancel (``ending``), saying how
        it was stopped."""
        name = self.label or self.task_id
        if self.mode == "process":
            how = ("its worker process and every process it started were killed; the worker "
                   "was replaced")
        else:
            how = ("a thread-mode task is stopped by an exception raised in its thread, which "
                   "takes effect only when the thread runs Python code again: one blocked in C "
                   "code or a system call may go on running, and processes it started are "
                   "not killed; use mode='process' for tasks that must be stoppable")
        if self.ending == "timeout":
            return TaskTimeoutError(
                f"task {name} ran longer than its timeout of {self.timeout:g} s and was "
                f"stopped ({how})")
        return TaskCancelledError(f"task {name} was cancelled ({how})")


class _WorkerHandle:
    """A worker process as the pool books it: its channel, the tasks sent to it, whether it
    lives (started, read and killed by :mod:`rpycsvc.server.workerprocess`)."""

    def __init__(self, role: str, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.role = role
        self.proc = proc
        self.sock = sock
        self.reader: threading.Thread | None = None
        self.send_lock = threading.Lock()
        self.tasks: dict[int, Task] = {}
        self.ready = threading.Event()
        self.alive = True
        self.stopping = ""  # why we killed it on purpose (timeout, cancel)

    def send(self, control: tuple[Any, ...], frames: tuple[Any, ...] = ()) -> None:
        with self.send_lock:
            _wire.send_msg(self.sock, control, frames)
