"""Module forwarding inside a worker process: whose client an import asks, and how the
request reaches it.

The finder (:class:`~rpycsvc.protocol.module_finder.ForwardedModules`, see
:mod:`rpycsvc.protocol.forwarding` for the whole design) asks :meth:`TaskImports.current_fetch`
how to get a module it lacks. The answer depends on which task the importing thread belongs
to, on whether the task still runs, and on which client started the thread; the request
itself goes to the server as a ``need-module`` message and waits at most
:data:`~rpycsvc.protocol.module_finder.FETCH_TIMEOUT` seconds for the ``module`` answer. That
is kept here, apart from the worker's main loop and task running
(:class:`rpycsvc.server.worker.Worker`), so that the rules of who may ask whom can be read in
one place. What this module needs of the worker is :class:`_Worker`.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from typing import Any, Protocol

from rpycsvc.protocol.forwarding import Reply
from rpycsvc.protocol.module_finder import FETCH_TIMEOUT, Fetch, timed_out
from rpycsvc.server.workerio import _TaskContext


class _Worker(Protocol):
    """What module forwarding needs of the worker (:class:`rpycsvc.server.worker.Worker`),
    which imports this module."""

    #: the task on the main thread (process role): threads it started import for it
    inline: _TaskContext | None

    def current(self) -> _TaskContext | None:
        """The task running on this thread, if any."""

    def send(self, control: tuple[Any, ...], frames: Any = ()) -> None:
        """Send a message to the server."""

    def recv_module(self, req: int, deadline: float) -> Reply | None:
        """Process role: read the channel (on the task's thread) for the answer to module
        request ``req``, until ``time.monotonic()`` ``deadline``; None: none came."""


class TaskImports:
    """A worker's end of module forwarding: each task's imports ask that task's client.

    In a process worker (``threaded`` False) the task runs on the main thread, so nobody
    else reads the channel while it waits: it reads the answer itself
    (:meth:`_Worker.recv_module`). In a thread worker the main loop reads the channel and
    hands each answer over with :meth:`answer`.
    """

    def __init__(self, worker: _Worker, threaded: bool) -> None:
        self._worker = worker
        self._threaded = threaded
        self._ids = itertools.count(1)
        self._waits: dict[int, list[Any]] = {}  # (thread role) request -> [event, reply]
        self._fetch_lock = threading.Lock()
        #: threads that were alive when a process-role task returned, each with the token of
        #: the client whose task it was first seen after: such a thread (a module-level
        #: thread pool's, say) may ask a later task's client for a module only if that is
        #: the same client, never another one
        self._past_threads: weakref.WeakKeyDictionary[threading.Thread, str] = \
            weakref.WeakKeyDictionary()

    def begin(self, ctx: _TaskContext, forwarding: Any) -> None:
        """Task ``ctx`` starts with option ``fwd`` ``forwarding``: None if its client
        forwards no modules, else (first) the client's token."""
        if forwarding is None:
            return
        task_id = ctx.task_id
        ctx.fetch = lambda name: self.fetch_from_server(task_id, name)
        if isinstance(forwarding, tuple) and forwarding:
            ctx.client = str(forwarding[0])

    def current_fetch(self) -> Fetch | None:
        """How the running task on this thread (or, in a process worker, the task running
        now, for threads it started) asks its client for a module."""
        ctx = self._worker.current()
        inline = self._worker.inline
        if ctx is None and inline is not None:
            ctx = inline
            past = self._past_threads.get(threading.current_thread())
            if past is not None and past != ctx.client and ctx.fetch is not None:
                return _refuse_other_client
        if ctx is None or ctx.fetch is None:
            return None
        inner = ctx.fetch

        def fetch(name: str) -> Reply:
            # Only while the task runs: afterwards the main loop reads the channel again,
            # and a reader here would take its messages.
            with ctx.fetch_lock:
                if not ctx.fetching:
                    return ("none", name)
                return inner(name)

        return fetch

    def end(self, ctx: _TaskContext) -> None:
        """Task ``ctx`` returned: wait (at most FETCH_TIMEOUT) for an import in flight of a
        thread it started, then close its fetch; in a process worker, every thread alive
        now is one no later task started: it is booked under this task's client (unless it
        already was under an earlier one), whose later tasks it may still import for."""
        got = ctx.fetch_lock.acquire(timeout=FETCH_TIMEOUT + 5)
        ctx.fetching = False
        if got:
            ctx.fetch_lock.release()
        if not self._threaded:
            main = threading.main_thread()
            for t in threading.enumerate():
                if t is not main:
                    self._past_threads.setdefault(t, ctx.client)

    def fetch_from_server(self, task_id: int, name: str) -> Reply:
        """Ask the server (which asks the task's client) for module ``name``; at most
        FETCH_TIMEOUT seconds."""
        req = next(self._ids)
        deadline = time.monotonic() + FETCH_TIMEOUT
        try:
            if not self._threaded:
                with self._fetch_lock:
                    self._worker.send(("need-module", task_id, req, name))
                    reply = self._worker.recv_module(req, deadline)
                    return timed_out(name, FETCH_TIMEOUT) if reply is None else reply
            slot: list[Any] = [threading.Event(), None]
            self._waits[req] = slot
            try:
                self._worker.send(("need-module", task_id, req, name))
                if not slot[0].wait(max(0.0, deadline - time.monotonic())):
                    return timed_out(name, FETCH_TIMEOUT)
                return slot[1]  # type: ignore[no-any-return, unused-ignore]
            finally:
                self._waits.pop(req, None)
        except (EOFError, OSError) as exc:
            return ("error", name, f"lost the channel to the server while fetching module "
                    f"{name!r}: {exc}")

    def answer(self, req: int, reply: Reply) -> None:
        """The server's ``module`` message for request ``req`` (thread role): wake its
        fetch (gone if it timed out)."""
        slot = self._waits.get(req)
        if slot is not None:
            slot[1] = reply
            slot[0].set()


def _refuse_other_client(name: str) -> Reply:
    """The fetch of a thread an earlier task of another client started: nothing is asked,
    and the import's ModuleNotFoundError says why (see ForwardedModules.explain)."""
    return ("error", name, "not asked for: this thread was started by an earlier task of "
            "another client, and may not get this task's client's modules (start the "
            "thread, or thread pool, in a task of this client)")
