"""The lane part of a worker process: serving tasks clients send straight to it.

The server hands a worker *lanes*: client sockets passed over ``SCM_RIGHTS`` (see
:mod:`rpycsvc.lane`). :class:`LaneServer` is the part of :class:`~rpycsvc.worker.Worker`
(a mixin sharing its state) that reads a task from a lane, checks it (it comes from a
client: a restricted server accepts endpoint calls with plain data only), runs it with its
output and result going back on the lane, notes it in the memory shared with the server,
and, while the worker is busy, hands other waiting lanes back to the server.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from . import _wire
from ._shared import WorkerState
from ._workerio import FLUSH_INTERVAL
from .config import check_timeout
from .forwarding import FETCH_TIMEOUT, Reply, timed_out
from .serialization import check_plain, loads_plain


@dataclass
class _LaneTask:
    """The lane task a worker runs now (shared by its main and flusher threads)."""

    lane_id: str
    label: str
    timeout: float | None
    started: float  # time.monotonic()
    key: int
    announced: bool = False  # the server was sent "lane-start" (a timeout, or it ran long)


def _lane_task(control: Any) -> tuple[int, str, Any, dict[str, Any]]:
    """``(key, kind, spec, options)`` of a lane's ``run`` message, checked: it comes from
    a client, so anything malformed is refused here, before it can upset the worker."""
    if not isinstance(control, tuple) or len(control) != 5 or control[0] != "run":
        raise ValueError(f"not a task message: {str(control)[:80]}")
    _, key, kind, spec, options = control
    if type(key) is not int or not 0 <= key < 1 << 62:
        raise ValueError(f"bad task key {key!r}")
    if kind not in ("pickled", "path", "endpoint") or not (spec is None or type(spec) is str):
        raise ValueError(f"bad task kind or name: {kind!r} {spec!r}")
    if type(options) is not tuple or not all(
            type(o) is tuple and len(o) == 2 and type(o[0]) is str for o in options):
        raise ValueError("bad task options")
    opts = dict(options)
    opts["timeout"] = check_timeout(opts.get("timeout"))
    opts["label"] = str(opts.get("label") or spec or "task")[:200]
    return key, kind, spec, opts


#: Largest task message a lane accepts (frames included).
LANE_MAX_MESSAGE = 1 << 36
#: A lane client that stops reading or writing mid-message for this long is dropped.
LANE_IO_TIMEOUT = 120.0


class _Lane:
    """A client's socket handed to this worker by the server."""

    def __init__(self, lane_id: str, sock: socket.socket, restricted: bool, number: int) -> None:
        self.id = lane_id
        self.number = number
        self.moved = False  # handed back to the server, or closed for shutdown: not ours
        self.broken = False  # a send failed: nothing more goes out
        self.ran: int | None = None  # key of the task that ran but whose reply failed
        self.sock = sock
        self.restricted = restricted
        self.lock = threading.Lock()
        self.fetch_lock = threading.Lock()  # one module request at a time (see fetch)
        self.fetch_ids = 0
        self.bytes_in = self.bytes_out = 0  # of the task in hand (see WorkerState.count)
        # Blocking, with kernel timeouts rather than Python's (which make the socket
        # non-blocking, and then MSG_WAITALL reads give up early).
        sock.setblocking(True)
        tv = struct.pack("ll", int(LANE_IO_TIMEOUT), 0)
        for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            sock.setsockopt(socket.SOL_SOCKET, opt, tv)

    def send(self, control: tuple[Any, ...], frames: tuple[Any, ...] = ()) -> None:
        """Send a message; after one failed send (the client gone, or not reading for
        LANE_IO_TIMEOUT) every later one fails at once: a half-written message must not
        be followed by more bytes the client would misread."""
        with self.lock:
            if self.broken:
                raise OSError("this lane is broken")
            try:
                _wire.send_msg(self.sock, control, frames)
            except OSError:
                self.broken = True
                raise
            self.bytes_out += sum(memoryview(f).nbytes for f in frames)

    def fetch(self, name: str) -> Reply:
        """Ask the lane's client for module ``name`` (rpycsvc.forwarding), waiting at most
        FETCH_TIMEOUT seconds. Called while one of its tasks runs: the client sends nothing
        else on the lane then, so the answer is the next message."""
        with self.fetch_lock:
            self.fetch_ids += 1
            req = self.fetch_ids
            deadline = time.monotonic() + FETCH_TIMEOUT
            try:
                self.send(("need-module", req, name))
                while True:
                    poller = select.poll()
                    poller.register(self.sock, select.POLLIN)
                    left = deadline - time.monotonic()
                    if left <= 0 or not poller.poll(max(0, int(left * 1000))):
                        return timed_out(name, FETCH_TIMEOUT)
                    control, _ = _wire.recv_msg(self.sock, max_bytes=LANE_MAX_MESSAGE)
                    if type(control) is tuple and len(control) == 3 \
                            and control[0] == "module" and control[1] == req:
                        return control[2]  # type: ignore[no-any-return, unused-ignore]
            except Exception as exc:  # (EOF, a broken lane, a malformed message)
                return ("error", name, f"the client's lane failed while sending module "
                        f"{name!r}: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class LaneServer:
    """The lane part of :class:`~rpycsvc.worker.Worker` (see the module docstring)."""

    # The worker's state this part uses (set up in Worker.__init__).
    state: WorkerState | None
    sel: selectors.BaseSelector | None
    sel_lock: threading.Lock
    busy_since: float
    current_lane: _Lane | None
    lane_task: _LaneTask | None
    lane_lock: threading.Lock
    lane_cancels: dict[str, int]
    endpoints: dict[str, Any]

    if TYPE_CHECKING:
        def send(self, control: tuple[Any, ...], frames: tuple[Any, ...] = (),
                 fds: tuple[int, ...] = ()) -> None: ...
        def run(self, task_id: int, kind: str, spec: Any, opts: dict[str, Any],
                frames: list[bytearray], send: Callable[..., None] | None = None,
                before_reply: Callable[[bool, tuple[Any, ...]], None] | None = None,
                fetch: Callable[[str], Reply] | None = None,
                ) -> tuple[bool, tuple[Any, ...] | None]: ...

    # -- what the main loop calls ---------------------------------------------------------
    def attach_lane(self, sel: selectors.BaseSelector, lane_id: str, restricted: bool,
                    number: int, *, fd: int) -> None:
        """Take the client socket ``fd`` the server handed us as lane ``lane_id``."""
        os.set_inheritable(fd, False)  # (received fds are; a task's children must not)
        lane = _Lane(lane_id, socket.socket(fileno=fd), restricted, number)
        try:
            lane.send(("lane-ready", os.getpid()))
            with self.sel_lock:
                sel.register(lane.sock, selectors.EVENT_READ, lane)
        except OSError:
            lane.close()
            self.send(("lane-closed", lane.id, None))

    def drop_lanes(self, sel: selectors.BaseSelector, lane_id: str | None = None) -> None:
        """Close lane ``lane_id`` (its client's connection closed), or every lane (the
        server is shutting down): their clients' next tasks go another way."""
        with self.sel_lock:
            lanes = [k.data for k in list(sel.get_map().values())
                     if k.data is not None and lane_id in (None, k.data.id)]
            for lane in lanes:
                sel.unregister(lane.sock)
                lane.moved = True  # gone: the loop skips it if select() just gave it
        for lane in lanes:
            lane.close()
            self.send(("lane-closed", lane.id, None))

    def lane_event(self, sel: selectors.BaseSelector, lane: _Lane) -> None:
        """``lane`` is readable: serve one task from it, or close it."""
        with self.sel_lock:  # claim it: never moved while we read or serve it
            if lane.moved:
                return
            self.current_lane = lane
        if self.state is not None:  # busy: the server sends nothing our way
            self.state.receiving(lane.number, time.monotonic())
        served = False
        try:
            served = self.serve_lane(lane)
        finally:
            if self.state is not None:
                self.state.end()
            with self.sel_lock:  # (so it can't be handed away in between)
                self.current_lane = None
                if not served and not lane.moved:
                    sel.unregister(lane.sock)
        if not served:
            lane.close()
            self.send(("lane-closed", lane.id, lane.ran))  # key of a task that ran, or None

    def announce(self, task: _LaneTask) -> None:
        """Tell the server of a lane task (call with ``lane_lock`` held)."""
        task.announced = True
        self.send(("lane-start", task.lane_id, task.label, task.timeout, task.started,
                   task.key))

    def move_waiting_lanes(self) -> None:
        """While our main thread is busy with a task, hand every other lane whose client
        waits for us back to the server, which gives it to an idle worker (the request
        still unread in the socket goes along). Without this, a client whose lane shares
        this worker would wait for another client's long task."""
        busy = self.busy_since
        if self.sel is None or not busy or time.monotonic() - busy < FLUSH_INTERVAL:
            return
        if not self.sel_lock.acquire(blocking=False):
            return  # the main thread is back in select(): not busy any more
        try:
            lanes = [k.data for k in list(self.sel.get_map().values())
                     if k.data is not None and k.data is not self.current_lane]
            if not lanes:
                return
            poller = select.poll()  # (select() can't watch descriptors over 1023)
            for lane in lanes:
                poller.register(lane.sock, select.POLLIN)
            waiting = {fd for fd, _ in poller.poll(0)}
            for lane in lanes:
                if lane.sock.fileno() in waiting:
                    self.sel.unregister(lane.sock)
                    lane.moved = True
                    self.send(("lane-move", lane.id), fds=(lane.sock.fileno(),))
                    lane.close()  # the server holds it now
        finally:
            self.sel_lock.release()

    def serve_lane(self, lane: _Lane) -> bool:
        """Run one task a client sent on its lane; False when the lane is done."""
        try:
            control, frames = _wire.recv_msg(
                lane.sock, loads=loads_plain if lane.restricted else _wire.pickle.loads,
                max_bytes=LANE_MAX_MESSAGE)
        except (EOFError, OSError):
            return False
        except Exception as exc:  # malformed or too large: say why, then hang up
            return self._refuse(lane, exc, None)
        if type(control) is tuple and control and control[0] == "module":
            return True  # a module sent after its request timed out: nothing to do
        key = control[1] if type(control) is tuple and len(control) > 1 \
            and type(control[1]) is int else None  # to name the task we refuse, if any
        try:
            key, kind, spec, opts = _lane_task(control)
            if lane.restricted:
                if kind != "endpoint":
                    raise PermissionError(
                        "this server runs in service-only mode (--no-classic): it accepts no "
                        "functions or import paths from clients; call a registered endpoint by "
                        f"name (it has: {', '.join(sorted(self.endpoints)) or 'none'})")
                check_plain(frames)
        except Exception as exc:  # refused (PermissionError is an OSError too)
            return self._refuse(lane, exc, key)
        cancelled = self.lane_cancels.get(lane.id)
        if cancelled is not None and cancelled <= key:  # (keys only grow: older ones are stale)
            del self.lane_cancels[lane.id]
            if cancelled == key:
                lane.send(("cancelled", key))
                return True
        lane.bytes_in += sum(len(f) for f in frames)
        task = _LaneTask(lane.id, opts["label"], opts["timeout"], time.monotonic(), key)
        with self.lane_lock:
            self.lane_task = task
            if self.state is not None:
                self.state.begin(lane.number, task.label, task.started, key)
            if task.timeout is not None:  # the server enforces it: it must know at once
                self.announce(task)
        outcome: list[Any] = [False, None]  # ok, and (type, message) if it raised

        def count(ok: bool, out: tuple[Any, ...]) -> None:
            # before the reply: whoever asks the server after it sees this task counted
            outcome[0] = ok
            if self.state is not None:
                self.state.count(ok, time.monotonic() - task.started, lane.bytes_in,
                                 lane.bytes_out + sum(memoryview(f).nbytes for f in out))

        try:
            # (a restricted lane forwards no modules: its tasks call endpoints only)
            outcome[:] = self.run(key, kind, spec, opts, frames, lane.send, count,
                                  None if lane.restricted else lane.fetch)
        except OSError:  # the task ran, but its client does not take the reply
            lane.ran = key
            return False
        finally:
            ok, why = outcome
            with self.lane_lock:
                self.lane_task = None
                if self.state is not None:
                    self.state.end()
                if task.announced or not ok:  # the server booked it, or a failure to record
                    self.send(("lane-end", lane.id, ok,
                               None if task.announced else (task.label, task.started), why))
            lane.bytes_in = lane.bytes_out = 0
        return True

    @staticmethod
    def _refuse(lane: _Lane, exc: Exception, key: Any) -> bool:
        """Tell the lane's client why its message (task ``key``, None if unreadable) was
        refused; the lane then closes."""
        try:
            lane.send(("fail", key, type(exc).__name__, str(exc)))
        except OSError:
            pass
        return False
