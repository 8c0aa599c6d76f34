"""The machinery under :mod:`rpycsvc.client.aio`: how a task's result reaches the event loop, and
how a task is sent without the loop's thread waiting on the network.

- :class:`AsyncTaskFuture`: the asyncio future of one task; cancelling it stops the task on
  its server.
- :class:`_Inbox`: completed ``TaskFuture``s handed to the loop in batches (one wake-up for
  every result that arrived meanwhile), without a lock the loop could wait on.
- :func:`_send_nowait`: send from the loop's thread as a connection's reader thread does
  (never waiting for the socket nor for room in the server): for small tasks.
- :class:`_Runtime`: per async object, its loop, inbox, sender thread (tasks with large
  arguments, which may wait for room in the server) and control pool (RPyC calls).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import deque
from collections.abc import Awaitable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from rpycsvc.client import connection as _connection
from rpycsvc.client.future import TaskFuture
from rpycsvc.errors import RpycsvcError

T = TypeVar("T")

#: Pickled arguments up to this size are sent from the loop's thread without waiting
#: (the server always has room for them unless this connection holds ~256 MiB there);
#: larger ones go through the sender thread, which may wait for room (``max_held``).
INLINE_BYTES = 1 << 20
#: An argument this large (``bytes``, a NumPy array...) is pickled by the sender thread too,
#: not on the loop's thread (pickling it copies it: milliseconds per tens of MB).
_BIG_ARGUMENT = 1 << 20
#: Threads of the private pool for control calls (stats, connect, close).
_CONTROL_THREADS = 4


class AsyncTaskFuture(asyncio.Future):
    """An asyncio future for one remote task: ``await`` it for the result.

    ``cancel()`` (also what ``asyncio.wait_for``, ``asyncio.timeout`` and a cancelled
    awaiting task do) stops the task on its server, as :meth:`rpycsvc.TaskFuture.stop`:
    a queued task is dropped, a running one's worker process is killed and replaced.
    ``address``, ``id``, ``stdout`` and ``stderr`` are those of the underlying
    :class:`~rpycsvc.TaskFuture` (``task_future``; None until the sender thread made it,
    for a task with large arguments)."""

    task_future: TaskFuture | None = None
    _lock: threading.Lock | None = None  # only for a task sent by the sender thread
    _cancel_asked = False

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        lock = self._lock
        if lock is None:
            tf = self.task_future
        else:  # the sender thread may be making the task right now: it checks the flag
            with lock:
                self._cancel_asked = True
                tf = self.task_future
        if tf is not None:
            # (dropping a queued task lets the cluster send the next one at once: from
            # here without waiting, as its reader threads send)
            _send_nowait(tf.stop)
        return True

    @property
    def address(self) -> str | None:
        return self.task_future.address if self.task_future is not None else None

    @property
    def id(self) -> str | None:
        return self.task_future.id if self.task_future is not None else None

    @property
    def stdout(self) -> str:
        return self.task_future.stdout if self.task_future is not None else ""

    @property
    def stderr(self) -> str:
        return self.task_future.stderr if self.task_future is not None else ""


_CANCELLED = frozenset({"CANCELLED", "CANCELLED_AND_NOTIFIED"})


def _transfer(afut: asyncio.Future, tfut: Future) -> None:
    """Settle ``afut`` (on the loop's thread) as ``tfut`` ended, unless it is done already.

    ``tfut`` is done (this runs after its done-callbacks were called), so its outcome is
    final: it is read without taking its lock, which the connections' reader threads
    may hold (waiting for it would hand them the GIL and stall the loop).

    It also breaks the reference cycles a finished task leaves (``afut`` → ``tfut`` → its
    done-callbacks → ``afut``; ``tfut`` → its stopper → the cluster's job → ``tfut``), so
    both die by reference count when the caller drops them instead of waiting for the
    cyclic garbage collector: ~20 objects per task that would otherwise pile up into
    slow full collections (pauses of the loop). Neither is used once ``tfut`` is done
    (its callbacks have run; ``stop()`` of a finished task does nothing), and the list is
    replaced, not cleared, as the thread that finished ``tfut`` may still iterate it."""
    tfut._done_callbacks = []  # type: ignore[attr-defined]
    if isinstance(tfut, TaskFuture):
        tfut._stopper = None
    if afut.done():
        return
    if tfut._state in _CANCELLED:
        afut.cancel()
        return
    exc = tfut._exception
    if exc is not None:
        afut.set_exception(awaitable_error(exc))
    else:
        afut.set_result(tfut._result)


def awaitable_error(exc: BaseException) -> BaseException:
    """``exc`` as an asyncio future can hold it: asyncio refuses ``StopIteration`` (it would
    end the awaiting coroutine silently), so a task that raised one (``next()`` on an empty
    iterator) fails with a ``RuntimeError`` caused by it, as PEP 479 does for generators."""
    if isinstance(exc, StopIteration):
        err = RuntimeError(f"the task raised StopIteration: {exc!r}")
        err.__cause__ = exc
        return err
    return exc


class _Inbox:
    """Completed futures handed from other threads to one event loop, in batches: the first
    completion wakes the loop, later ones join the batch that wake-up will drain.

    No lock (the loop's thread never waits for a reader thread here): ``deque`` appends and
    pops are atomic, and a sender appends before it reads ``_scheduled`` while the drain
    clears it before it pops, so an item is either drained by the pending wake-up or its
    sender schedules another (at worst one wake-up too many, never one too few)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque[tuple[asyncio.Future, Future]] = deque()
        self._scheduled = False

    def link(self, afut: asyncio.Future, tfut: Future) -> None:
        """``afut`` (of this loop) settles as ``tfut`` (settled in any thread) does."""
        tfut.add_done_callback(functools.partial(self.put, afut))

    def put(self, afut: asyncio.Future, tfut: Future) -> None:
        self._items.append((afut, tfut))
        if self._scheduled:
            return
        self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody awaits these any more
            self._items.clear()

    def _drain(self) -> None:
        self._scheduled = False
        pop = self._items.popleft
        while True:
            try:
                afut, tfut = pop()
            except IndexError:
                return
            try:
                _transfer(afut, tfut)
            except Exception as exc:  # one future that can't be settled must not strand the rest
                if not afut.done():
                    afut.set_exception(exc)


def _looks_big(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """True if an argument is a large buffer (bytes, a NumPy array...): cheap, shallow."""
    for value in (*args, *kwargs.values()):
        n = getattr(value, "nbytes", None)
        if n is None and isinstance(value, (bytes, bytearray, memoryview, str)):
            n = len(value)
        if isinstance(n, int) and n >= _BIG_ARGUMENT:
            return True
    return False


def _nbytes(frames: tuple[Any, ...]) -> int:
    return sum(memoryview(f).nbytes for f in frames)


def _send_nowait(send: Callable[[], T]) -> T:
    """Run ``send`` (which sends a task) as a connection's reader thread would: it never
    waits for room in the server nor for the socket (a full socket's message goes to the
    connection's writer thread). Only for small tasks: see :data:`INLINE_BYTES`."""
    flag = _connection._READER
    outer = getattr(flag, "on", False)
    flag.on = True
    try:
        return send()
    finally:
        flag.on = outer


class _Runtime:
    """What an async object needs of its loop: the loop, the hand-over of results, the
    sender thread and the pool for control calls. One per AsyncCluster (shared with its
    AsyncClients) or per AsyncClient of :func:`aconnect`."""

    def __init__(self) -> None:
        self.control = ThreadPoolExecutor(_CONTROL_THREADS, thread_name_prefix="rpycsvc-aio")
        self.sender = ThreadPoolExecutor(1, thread_name_prefix="rpycsvc-aio-send")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.inbox: _Inbox | None = None
        self.closed = False

    def bind(self) -> asyncio.AbstractEventLoop:
        """The running loop; the first call binds us to it, later ones check it."""
        loop = asyncio.get_running_loop()
        if self.closed:
            raise RpycsvcError("this rpycsvc async cluster or connection is closed")
        if self.loop is None:
            self.loop, self.inbox = loop, _Inbox(loop)
        elif loop is not self.loop:
            raise RpycsvcError("this rpycsvc async object belongs to another event loop: "
                               "use it only in the loop that started it")
        return loop

    def call(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """``fn(*args)`` on the control pool, awaited (never on the loop's thread)."""
        return self.bind().run_in_executor(self.control, functools.partial(fn, *args))

    def start(self, afut: AsyncTaskFuture, make: Callable[[], TaskFuture]) -> None:
        """Make and send a task on the sender thread (it may wait for room in the server);
        ``afut`` follows it. ``make`` pickles and sends, returning its TaskFuture."""
        inbox = self.inbox
        loop = self.loop
        assert inbox is not None and loop is not None
        afut._lock = threading.Lock()

        def work() -> None:
            try:
                tf = make()
            except BaseException as exc:  # pickling failed, the cluster closed...
                loop.call_soon_threadsafe(_fail, afut, exc)
                return
            with afut._lock:  # type: ignore[union-attr]
                afut.task_future = tf
                stop = afut._cancel_asked
            if stop:
                tf.stop()
            inbox.link(afut, tf)

        self.sender.submit(work)

    def shutdown(self) -> None:
        self.closed = True
        self.sender.shutdown(wait=False)
        self.control.shutdown(wait=False)


def _fail(afut: asyncio.Future, exc: BaseException) -> None:
    if not afut.done():
        afut.set_exception(awaitable_error(exc))
