"""The result side of ``Cluster.map``: the loop that waits for a map's chunks and hands their
results on, and :class:`MapIterator`, what ``map`` returns.

:mod:`rpycsvc.client.mapping` plans a map (its chunk sizes, its input feed, a job per
chunk); this module runs it: it keeps the window of chunks in flight, waits for the next
chunk in input order (or for any, unordered) within the map's deadline, yields each
chunk's results — raising a failed item's error after the results before it — and stops
what is still in flight when the map is closed or dropped. Waiting for results is one
concept, planning the chunks another; they change for different reasons.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import queue
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Protocol, cast

from rpycsvc.client.jobs import _Job
from rpycsvc.client.scheduler import Scheduler
from rpycsvc.errors import RpycsvcTimeoutError
from rpycsvc.protocol.mapchunks import END, chunk_queue, end_early
from rpycsvc.protocol.tracebacks import load_exception

if TYPE_CHECKING:
    from rpycsvc.client.progress import Progress


class _Feed(Protocol):
    """What the loop needs of a map's input side (:class:`rpycsvc.client.mapping.ChunkFeed`)."""

    def take(self, in_flight: int) -> Iterator[Sequence[Any]]: ...

    def wait_until(self) -> float | None: ...

    @property
    def error(self) -> BaseException | None: ...


def results_by_chunk(scheduler: Scheduler, new_feed: Callable[[], _Feed],
                     make_job: Callable[[Sequence[Any]], _Job], *, ordered: bool,
                     deadline: float | None, bar: Progress | None) -> Iterator[Iterator[Any]]:
    """Each chunk's results, in turn (in input order if ``ordered``): a generator, so
    nothing is taken from the input (``new_feed()``) before the first result is asked for.
    ``deadline`` (``time.monotonic()``) bounds the whole iteration; closing the generator
    stops the chunks still in flight, and closes ``bar``."""
    feed = new_feed()
    inflight: deque[_Job] = deque()
    done_q: queue.SimpleQueue[_Job] = queue.SimpleQueue()
    current: deque[Any] = deque()
    try:
        while True:
            for items in feed.take(len(inflight)):
                job = make_job(items)
                if not ordered:  # (in order, nothing reads the queue: it would keep
                    # every result of the map alive)
                    job.future.add_done_callback(functools.partial(_put, done_q, job))
                inflight.append(job)
                scheduler.enqueue([job])
            if not inflight:
                if feed.error is not None:  # the input's own, after what it gave before
                    raise feed.error
                return
            until = feed.wait_until()
            if ordered:
                job = inflight[0]
                if not _wait_future(job.future, deadline, until):
                    continue
                inflight.popleft()
            else:
                got = _next_done(done_q, deadline, until)
                if got is None:
                    continue
                job = got
                inflight.remove(job)
            if bar is not None:
                bar.update(job.size, job.server.address if job.server else "?")
            address = job.server.address if job.server else None
            current, failed = chunk_queue(job.future.result())
            del job  # (its future holds the chunk's results)
            # (the results up to the first failed item, if any)
            yield iter(current.popleft, END)
            if failed is not None:
                raise load_exception(failed, address)
    finally:
        end_early(current)  # closed mid-chunk: its results end too (and are let go)
        for job in inflight:
            job.future.stop()
        if bar is not None:
            bar.close()


class MapIterator(itertools.chain):
    """What ``Cluster.map`` returns: its results, one chunk's after another, with no Python
    code per result (``itertools.chain``'s ``__next__``: a map of cheap items is paced by
    how fast its consumer takes them, issue 15). :meth:`close` abandons the map as a
    generator's would: its chunks still in flight are stopped on their servers. Dropping
    the iterator does the same."""

    _chunks: Iterator[Iterator[Any]]

    @classmethod
    def over(cls, chunks: Iterator[Iterator[Any]]) -> MapIterator:
        """The results of ``chunks`` (an iterator of each chunk's results), in turn."""
        it = cast(MapIterator, cls.from_iterable(chunks))
        it._chunks = chunks
        return it

    def close(self) -> None:
        """Stop the map: no more results; what it has in flight is stopped."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def _put(q: queue.SimpleQueue[_Job], job: _Job, _fut: Any) -> None:
    q.put(job)


#: Before Python 3.11 ``Future`` waits raise this, which is not the builtin TimeoutError.
_FUTURE_TIMEOUTS = (TimeoutError, concurrent.futures.TimeoutError)


def _wait_future(fut: Future[Any], deadline: float | None, until: float | None = None
                 ) -> bool:
    """Wait for ``fut``: True when it is done; False if ``until`` came first. Raises
    :class:`RpycsvcTimeoutError` if the map's ``deadline`` came first."""
    stop = deadline if until is None else until if deadline is None else min(until, deadline)
    left = None if stop is None else stop - time.monotonic()
    if left is None or left > 0:
        try:
            fut.exception(timeout=left)  # waits; raises only on timeout or cancellation
            return True
        except _FUTURE_TIMEOUTS:
            pass
    if fut.done():
        return True
    if deadline is not None and time.monotonic() >= deadline:
        raise RpycsvcTimeoutError("map: the next result was not ready before the map's "
                                  "deadline (its timeout=)")
    return False


def _next_done(done_q: queue.SimpleQueue[_Job], deadline: float | None,
               until: float | None = None) -> _Job | None:
    """The next finished chunk; None if ``until`` came first. Raises
    :class:`RpycsvcTimeoutError` if the map's ``deadline`` came first."""
    stop = deadline if until is None else until if deadline is None else min(until, deadline)
    left = None if stop is None else max(0.0, stop - time.monotonic())
    try:
        return done_q.get(timeout=left)
    except queue.Empty:
        pass
    if deadline is not None and time.monotonic() >= deadline:
        raise RpycsvcTimeoutError("map: no result arrived before the map's deadline "
                                  "(its timeout=)") from None
    return None
