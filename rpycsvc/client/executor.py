"""``cluster.executor()``: a ``concurrent.futures.Executor`` that runs on a cluster."""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import wait as _wait
from typing import Any, Protocol

from rpycsvc.client.future import TaskFuture
from rpycsvc.errors import RpycsvcTimeoutError

#: Before Python 3.11 ``Future`` waits raise this, which is not the builtin TimeoutError.
_FUTURE_TIMEOUTS = (TimeoutError, concurrent.futures.TimeoutError)


class _Submitter(Protocol):
    """What the executor needs of a :class:`~rpycsvc.Cluster`: its ``submit``."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> TaskFuture: ...


class ClusterExecutor(Executor):
    """``concurrent.futures.Executor`` over a cluster (``with cluster.executor() as ex:``).

    It keeps the stdlib's contract, unlike the lazy :meth:`Cluster.map`: ``map`` submits
    every item at once; ``submit`` and ``map`` after ``shutdown()`` raise ``RuntimeError``;
    ``future.cancel()`` cancels only a task not yet sent to a server, and
    ``shutdown(cancel_futures=True)`` cancels only those (``future.stop()`` stops a running
    one). Futures are :class:`~rpycsvc.client.future.TaskFuture`."""

    def __init__(self, cluster: _Submitter) -> None:
        self._cluster = cluster
        self._futures: set[Future] = set()
        # (re-entrant: submitting may settle other futures of ours in this thread)
        self._lock = threading.RLock()
        self._shutdown = False

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> TaskFuture:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            fut = self._cluster.submit(fn, *args, **kwargs)
            self._futures.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: Future) -> None:
        # Without the lock (set.discard is atomic): this runs in the connections' reader
        # threads, which must never wait for a submit() that is sending a task.
        self._futures.discard(fut)

    def map(self, fn: Any, *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """``Executor.map``: every item is submitted now (``chunksize`` items per task);
        results come in input order; ``timeout`` is the deadline for the whole iteration,
        counted from this call (:class:`~rpycsvc.RpycsvcTimeoutError`, a ``TimeoutError``).
        A task that raised re-raises when its result is reached. Items not reached when the
        iterator is closed are cancelled if they were not sent yet."""
        if chunksize < 1:
            raise ValueError(f"chunksize must be >= 1; got {chunksize!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        if chunksize == 1:
            futs = [self.submit(fn, *args) for args in zip(*iterables)]
        else:
            calls = zip(*iterables)
            futs = []
            while True:
                chunk = list(itertools.islice(calls, chunksize))
                if not chunk:
                    break
                futs.append(self.submit(_apply_chunk, fn, chunk))
        return _results(futs, deadline, chunked=chunksize > 1, timeout=timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new tasks; with ``cancel_futures``, cancel those not sent to a server yet
        (running ones go on: ``future.stop()`` stops one); with ``wait``, wait for the rest."""
        with self._lock:
            self._shutdown = True
            futures = list(self._futures)
        if cancel_futures:
            for f in futures:
                f.cancel()
        if wait:
            _wait(futures)

    def __enter__(self) -> ClusterExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=True)


def _apply_chunk(fn: Any, chunk: list[tuple[Any, ...]]) -> list[Any]:
    """Runs on the server: one task of ``Executor.map`` with ``chunksize`` > 1."""
    return [fn(*args) for args in chunk]


def _results(futs: list[TaskFuture], deadline: float | None, *, chunked: bool,
             timeout: float | None) -> Iterator[Any]:
    """``Executor.map``'s iterator. It drops each future (and so its result) as it yields
    it, as the stdlib's does, and cancels what is left if it is closed early."""
    futs.reverse()
    try:
        while futs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                futs[-1].exception(timeout=left)  # waits; raises on timeout or cancel
            except _FUTURE_TIMEOUTS as exc:
                raise RpycsvcTimeoutError(
                    f"Executor.map: a result was not ready within its timeout of "
                    f"{timeout:g} s") from exc
            if chunked:
                values = futs.pop().result()
                values.reverse()
                while values:
                    yield values.pop()
            else:
                yield futs.pop().result()
    finally:
        for f in futs:
            f.cancel()
