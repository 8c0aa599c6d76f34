"""The future of one remote task: :class:`TaskFuture`, and :func:`settle` to complete one.

A ``concurrent.futures.Future`` with the task's id, the server it runs on, its captured
output and a :meth:`~TaskFuture.stop` that reaches the server. A connection
(:mod:`rpycsvc.client.connection`) and a cluster (:mod:`rpycsvc.client.cluster`) both hand
these out.
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable

from rpycsvc.client.html import future_html
from rpycsvc.client.output import current_cell
from rpycsvc.errors import TaskCancelledError

log = logging.getLogger("rpycsvc.client")


class TaskFuture(Future):
    """A ``concurrent.futures.Future`` for one remote task, plus where it ran and its output.

    Its states are the stdlib's. It is *pending* while it waits in a cluster's queue on this
    machine, and *running* from the moment it is sent to a server (``running()`` is True):
    the task protocol has no "started" message, so a task sent may still wait in the
    server's own queue. ``client.submit`` sends at once, so its futures start running.

    - ``cancel()`` is the stdlib's: True only for a pending task, which then never reaches a
      server; False once it is running or done (the task goes on).
    - :meth:`stop` stops the task wherever it is: a pending one is cancelled, a running one
      is stopped on its server (its worker process is killed and replaced) and this future
      fails at once with :class:`~rpycsvc.TaskCancelledError`.
    """

    def __init__(self) -> None:
        super().__init__()
        # like Celery's task id, to log and to correlate (random, not secret: no urandom
        # syscall per task, which costs more than the rest of this constructor)
        self.id = f"{random.getrandbits(128):032x}"
        self.address: str | None = None
        self._out: dict[int, list[str]] | None = None  # captured output: see add_output
        #: drops the task wherever it is: from a cluster's queue, or from its server
        self._stopper: Callable[[], None] | None = None
        #: the Jupyter cell that submitted the task: its prints go there (rpycsvc.client.output)
        self._cell = current_cell()

    @property
    def stdout(self) -> str:
        """What the task printed to stdout, with ``output="capture"`` (else "")."""
        return "".join(self._out[1]) if self._out is not None else ""

    @property
    def stderr(self) -> str:
        """What the task printed to stderr, with ``output="capture"`` (else "")."""
        return "".join(self._out[2]) if self._out is not None else ""

    def add_output(self, fd: int, text: str) -> None:
        """Capture ``text`` printed to ``fd`` (1 or 2). Kept in pieces, joined when read:
        appending to one string would copy all of it again for every piece."""
        if self._out is None:
            self._out = {1: [], 2: []}
        self._out[1 if fd == 1 else 2].append(text)

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self._stopper = None  # (see _finished)

    def set_exception(self, exception: BaseException | None) -> None:
        super().set_exception(exception)
        self._stopper = None  # (see _finished)

    # A finished task has nothing to stop, and a cluster's stopper holds the task's job,
    # which holds this future: dropping it leaves no reference cycle, so a finished task
    # is freed at once rather than by the garbage collector (whose full collections of
    # many tasks' leftovers pause every thread, an event loop's included).

    def cancel(self) -> bool:
        """Cancel the task if it is still pending (not sent to a server): the stdlib's
        contract. False for a running task: use :meth:`stop` to stop that one."""
        if not super().cancel():
            return False
        self._stop_remote()
        return True

    def stop(self) -> bool:
        """Stop the task wherever it is; False if it had finished already.

        Pending: as ``cancel()`` (``cancelled()`` is then True). Running: the server is asked
        to stop it (a process-mode task's worker is killed with its child processes and
        replaced; a thread-mode task gets an exception the next time its thread runs Python
        code) and this future fails at once with :class:`~rpycsvc.TaskCancelledError`
        without waiting for the server; a result that still arrives is dropped."""
        stopper = self._stopper  # (before cancel(): it may be dropped as this fails)
        if self.cancel():
            return True
        where = f" on {self.address}" if self.address else ""
        try:
            self.set_exception(TaskCancelledError(
                f"the task was stopped (future.stop()){where}", address=self.address))
        except InvalidStateError:  # it finished meanwhile
            return False
        self._stop_remote(stopper)
        return True

    def _repr_html_(self) -> str:
        """The future as Jupyter shows it: state, where it runs, result or error."""
        return future_html(self)

    def _stop_remote(self, stopper: Callable[[], None] | None = None) -> None:
        stopper = stopper or self._stopper
        if stopper is not None:
            try:
                stopper()
            except Exception:  # the connection is gone: nothing runs there any more
                log.debug("stopping task %s failed", self.id, exc_info=True)


def settle(fut: Future, result: Any, exc: BaseException | None) -> None:
    """Complete ``fut`` unless it is done already (e.g. cancelled by its owner meanwhile)."""
    if fut.done():
        return
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except Exception:
        pass  # cancelled between the check and the set
