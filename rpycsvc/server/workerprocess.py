"""Worker processes from the pool's side: start one, read its messages, see it die, kill it.

A worker is started as ``python -m rpycsvc.server.worker``, and killed with every process its
tasks started.

What a worker's messages mean for the pool's books (a task done, a worker ready or gone) is
the pool's business: the reader hands them to a :class:`WorkerEvents`, the
:class:`~rpycsvc.server.pool.WorkerPool`. A task's output and its module requests go
straight to the task's own callbacks.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any, Protocol

from rpycsvc.server import wire as _wire
from rpycsvc.server.task import _WorkerHandle

log = logging.getLogger("rpycsvc.pool")


class WorkerEvents(Protocol):
    """What a worker's reader thread tells the pool (:class:`~rpycsvc.server.pool.WorkerPool`)."""

    def on_worker_ready(self, w: _WorkerHandle, control: tuple[Any, ...]) -> None: ...

    def on_task_done(self, w: _WorkerHandle, task_id: int, ok: bool, service_s: float | None,
                     frames: list[Any], framed: int | None = None) -> None: ...

    def on_worker_exit(self, w: _WorkerHandle) -> None: ...


def spawn_worker(role: str, *, threads: int, endpoints: list[str],
                 memory_limit: int) -> _WorkerHandle:
    """Start a worker process of ``role`` (``"process"`` or ``"thread"``) on a socketpair; once
    the pool has booked it, :func:`watch_worker` starts reading it."""
    parent, child = socket.socketpair()
    cmd = [sys.executable, "-m", "rpycsvc.server.worker", "--fd", str(child.fileno()),
           "--role", role, "--threads", str(max(1, threads))]
    if endpoints:
        cmd += ["--endpoints", ",".join(endpoints)]
    if memory_limit:
        cmd += ["--memory-limit", str(memory_limit)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    fds = [child.fileno()]
    bundle_fd = os.environ.get("RPYCSVC_BUNDLE_FD")
    if bundle_fd and bundle_fd.isdigit():
        fds.append(int(bundle_fd))
    # (The worker makes itself a process group leader: see _kill_tree.)
    proc = subprocess.Popen(
        cmd, pass_fds=fds, env=env, stdin=subprocess.DEVNULL, close_fds=True,
        stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else None)
    child.close()
    return _WorkerHandle(role, proc, parent)


def watch_worker(handle: _WorkerHandle, events: WorkerEvents) -> None:
    """Start the threads that read ``handle``'s messages (see :func:`_reader`) and wait for
    its process to end (:func:`_watch`)."""
    pid = handle.proc.pid
    handle.reader = threading.Thread(target=_reader, args=(handle, events),
                                     name=f"rpycsvc-w{pid}", daemon=True)
    handle.reader.start()
    threading.Thread(target=_watch, args=(handle,), name=f"rpycsvc-wait{pid}",
                     daemon=True).start()


def _watch(w: _WorkerHandle) -> None:
    """Wait for the worker process to end, then end its channel on our side, so that
    its reader sees the death now: a child the task forked holds the worker's end of the
    channel open, and without this the death showed only when that child exited.
    (Messages the worker sent before it died are still read: shutting down our side for
    reading does not drop what is queued.)"""
    try:
        w.proc.wait()
    except Exception:  # (never expected; the reader still sees the channel's end)
        log.exception("waiting for worker %s failed", w.proc.pid)
        return
    try:
        w.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _reader(w: _WorkerHandle, events: WorkerEvents) -> None:
    """Read ``w``'s messages until its channel ends: output and module requests go to their
    task's callbacks, the rest to ``events``; then ``events.on_worker_exit``."""
    recv = _wire.Reader(w.sock).recv_msg  # reads ahead: one recv per small message
    try:
        while True:
            control, frames = recv()
            op = control[0]
            try:
                if op == "framed":  # a result framed for the client (worker.py): relayed
                    events.on_task_done(w, control[1], True, control[2], frames, control[3])
                elif op == "done":
                    events.on_task_done(w, control[1], control[2], control[3], frames)
                elif op == "out":
                    task = w.tasks.get(control[1])
                    if task is not None and task.on_output is not None:
                        task.on_output(control[2], control[3])
                elif op == "log":  # a pickled logging record, passed on as bytes
                    task = w.tasks.get(control[1])
                    if task is not None and task.on_output is not None:
                        task.on_output(0, control[2])
                elif op == "need-module":
                    _on_need_module(w, *control[1:])
                elif op == "ready":
                    events.on_worker_ready(w, control)
            except Exception:  # a bug here must not silence this worker for good
                log.exception("error handling %r from worker %s", op, w.proc.pid)
            del control, frames  # don't keep the last (maybe 64 MiB) message alive
    except (EOFError, OSError):
        pass
    events.on_worker_exit(w)


def _on_need_module(w: _WorkerHandle, task_id: int, req: int, name: str) -> None:
    """A task of ``w`` imports a module the worker lacks: ask the task's client
    (rpycsvc.protocol.forwarding). Never waits here: the answer goes to the worker when it comes
    (the worker bounds the wait)."""
    def answer(reply: Any) -> None:
        try:
            w.send(("module", req, reply))
        except OSError:
            pass  # the worker is gone

    task = w.tasks.get(task_id)
    if task is None or task.on_module is None:
        answer(("none", name))
        return
    try:
        task.on_module(name, answer)
    except Exception as exc:  # e.g. the client's connection closed
        answer(("error", name, f"could not ask the client for module {name!r}: "
                f"{type(exc).__name__}: {exc}"))


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker's process group: the worker and whatever its tasks started (the
    worker makes itself the leader of a group of its own as it starts, before it runs any
    task). The group outlives the worker while a member lives, so this also reaches what a
    dead worker left behind. (A new group, not a new session: with scheduler autogroups, a
    session of its own changed how workers were scheduled against the server.)"""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        try:  # (no such group: the worker alone, if it is not reaped yet)
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
        except OSError:
            pass


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " — possibly out of memory" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"
