"""``AsyncCluster.map``, ``as_completed`` and ``map_reduce``: the sync fan-out, awaited.

``map`` is :func:`rpycsvc.client.mapping.run_map` (its loop:
:func:`rpycsvc.client.map_results.results_by_chunk`) with its waits turned into awaits: the same
chunk sizer, window, jobs and progress bar, queued on the same :class:`~rpycsvc.Cluster`; only
waiting differs. It is an async generator, so leaving ``async for`` early (``break``, an exception,
a cancelled task) closes it, and closing it cancels its unfinished chunks, which stops
them on the servers (after a ``break`` asyncio closes it as soon as it is dropped).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Future
from typing import TYPE_CHECKING, Any, Callable, Protocol

from rpycsvc.client.jobs import _Job
from rpycsvc.client.mapping import (
    ChunkFeed,
    ChunkSizer,
    Items,
    PartialFold,
    plan_map,
    reduce_chunk,
)
from rpycsvc.errors import ConfigError, RpycsvcTimeoutError
from rpycsvc.protocol.mapchunks import chunk_results
from rpycsvc.protocol.tracebacks import load_exception

if TYPE_CHECKING:
    from rpycsvc.client.aio_bridge import AsyncTaskFuture, _Runtime
    from rpycsvc.client.cluster import Cluster
    from rpycsvc.client.progress import Progress


class FanOutCluster(Protocol):
    """What the fan-out needs of an :class:`rpycsvc.AsyncCluster`: its sync cluster, its
    hand-over to the event loop, and sending a task (so this module needs not import it)."""

    _rt: _Runtime

    @property
    def cluster(self) -> Cluster: ...

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> AsyncTaskFuture: ...

    def send(self, afut: AsyncTaskFuture, job: _Job) -> None: ...


def async_map(ac: FanOutCluster, fn: Any, iterables: tuple[Items, ...], *,
             ordered: bool, chunksize: int | None, timeout: float | None, retries: int,
             opts: dict[str, Any], progress: bool = False) -> AsyncIterator[Any]:
    """Validate eagerly (as the sync ``map``), then return the lazy async iterator.
    ``progress``: the sync map's bar (:class:`~rpycsvc.client.progress.Progress`), shown
    while the iteration runs."""
    total, sizer, window, make_job = plan_map(ac.cluster._scheduler, fn, iterables,
                                              chunksize=chunksize, retries=retries, opts=opts)
    deadline = None if timeout is None else time.monotonic() + timeout
    return _results(ac, iterables, make_job, sizer, window, ordered, deadline,
                    total if progress else -1)


def _bar(total: int | None) -> Progress:
    from rpycsvc.client.progress import Progress

    return Progress(total)


async def _results(ac: FanOutCluster, iterables: tuple[Items, ...],
                   make_job: Callable[[Sequence[Any]], _Job], sizer: ChunkSizer,
                   window: int, ordered: bool, deadline: float | None,
                   bar_total: int | None = -1) -> AsyncIterator[Any]:
    """The results; ``bar_total`` -1: no progress bar, else the bar's total (None: unknown).
    The bar is shown from the first ``__anext__`` and closed with the generator."""
    from rpycsvc.client.aio_bridge import AsyncTaskFuture
    from rpycsvc.client.aio_source import Pump, async_source, take_chunks

    loop = ac._rt.bind()
    feed = ChunkFeed(iterables, sizer, window)
    source = async_source(iterables)
    pump = None if source is None else Pump(source)
    inflight: deque[AsyncTaskFuture] = deque()
    finished: asyncio.Queue[AsyncTaskFuture] = asyncio.Queue()
    bar = None if bar_total == -1 else _bar(bar_total)
    sizes: dict[AsyncTaskFuture, int] = {}  # items per chunk in flight (for the bar)
    try:
        while True:
            for items in take_chunks(feed, pump, len(inflight)):
                afut = AsyncTaskFuture(loop=loop)
                if not ordered:
                    afut.add_done_callback(finished.put_nowait)
                inflight.append(afut)
                if bar is not None:
                    sizes[afut] = len(items)
                ac.send(afut, make_job(items))
            # an async input that has nothing yet, while the window has room: its next
            # item is worth waiting for too
            arrival = pump.arrival() if pump is not None and pump.starved else None
            if not inflight:
                if arrival is None:
                    error = feed.error if pump is None else pump.error
                    if error is not None:
                        raise error  # the input's own, after the results of what it gave
                    return
                await _wait_one(arrival, deadline, pump.partial_at if pump else None)
                continue
            until = feed.wait_until()
            if ordered:
                afut = inflight[0]
                if not await _wait_one(afut, deadline, until, arrival):
                    continue
                inflight.popleft()
            else:
                got = await _next_done(finished, deadline, until, arrival)
                if got is None:
                    continue
                afut = got
                inflight.remove(afut)
            address = afut.address
            if bar is not None:
                bar.update(sizes.pop(afut, 0), address or "?")
            # (a chunk that failed as a whole raises here)
            values, failed = chunk_results(afut.result())
            del afut  # (it holds the chunk's results)
            while True:  # (no variable: none keeps a result alive once it is yielded)
                try:
                    yield next(values)
                except StopIteration:
                    break
            if failed is not None:
                raise load_exception(failed, address)
    finally:
        if pump is not None:
            pump.close()
        for afut in inflight:  # abandoned: stopped on the servers too
            afut.cancel()
        if bar is not None:
            bar.close()


def _left(deadline: float | None, until: float | None) -> float | None:
    stop = deadline if until is None else until if deadline is None else min(until, deadline)
    return None if stop is None else max(0.0, stop - time.monotonic())


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise RpycsvcTimeoutError("map: the next result was not ready before the map's "
                                  "deadline (its timeout=)")


async def _wait_one(afut: asyncio.Future, deadline: float | None,
                    until: float | None, also: asyncio.Future | None = None) -> bool:
    """Wait for ``afut``: True once done, False if ``until`` came first (or ``also`` is
    done: input arrived); raises :class:`RpycsvcTimeoutError` at the map's deadline.
    Never cancels ``afut`` itself (a cancellation of the waiter reaches the map's
    ``finally``, which does)."""
    if not afut.done():
        await asyncio.wait((afut,) if also is None else (afut, also),
                           timeout=_left(deadline, until), return_when=FIRST_COMPLETED)
    if afut.done():
        return True
    if also is not None and also.done():
        return False
    _check_deadline(deadline)
    return False


async def _next_done(finished: asyncio.Queue[AsyncTaskFuture], deadline: float | None,
                     until: float | None, also: asyncio.Future | None = None
                     ) -> AsyncTaskFuture | None:
    """The next finished chunk (unordered map), None if ``until`` came first (or ``also``
    is done: input arrived)."""
    if not finished.empty():
        return finished.get_nowait()
    left = _left(deadline, until)
    if also is None:
        try:
            return await asyncio.wait_for(finished.get(), left)
        except asyncio.TimeoutError:
            pass
    else:
        getter = asyncio.ensure_future(finished.get())
        try:
            await asyncio.wait((getter, also), timeout=left, return_when=FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()  # (a get not done took nothing from the queue)
        if getter.done() and not getter.cancelled():
            return getter.result()
        if also.done():
            return None
    _check_deadline(deadline)
    return None


async def as_completed(ac: FanOutCluster, futures: Iterable[Awaitable[Any]],
                       timeout: float | None = None
                       ) -> AsyncIterator[asyncio.Future]:
    """Each of ``futures`` once it is done, first finished first. They may be asyncio
    futures or tasks, coroutines (run as tasks) or sync ``TaskFuture``s. Leaving early
    cancels nothing: the futures are the caller's."""
    loop = ac._rt.bind()
    inbox = ac._rt.inbox
    assert inbox is not None
    todo: list[asyncio.Future] = []
    for f in dict.fromkeys(futures):  # (each once, in order)
        if isinstance(f, Future):
            af: asyncio.Future = loop.create_future()
            inbox.link(af, f)
            todo.append(af)
        else:
            todo.append(asyncio.ensure_future(f))
    finished: asyncio.Queue[asyncio.Future] = asyncio.Queue()
    for af in todo:
        af.add_done_callback(finished.put_nowait)
    deadline = None if timeout is None else time.monotonic() + timeout
    for i in range(len(todo)):
        if deadline is None:
            yield await finished.get()
            continue
        try:
            yield await asyncio.wait_for(finished.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise RpycsvcTimeoutError(
                f"as_completed: {len(todo) - i} of {len(todo)} futures were not done within "
                f"{timeout:g} s") from None


async def map_reduce(ac: FanOutCluster, fn: Any, reducer: Callable[[Any, Any], Any],
                     iterable: Items, *, initializer: Any, by_key: bool,
                     chunksize: int | None, timeout: float | None,
                     progress: bool = False) -> Any:
    """``rpycsvc.client.mapping.run_map_reduce``, awaited: chunks reduce on the servers, the
    partials here in input order (the reducer need not be commutative). ``progress``: the
    sync bar, counting each chunk's items as it arrives (in any order). An async iterable
    is read to its end first, as a plain one is."""
    items = [x async for x in iterable] if hasattr(iterable, "__aiter__") else list(iterable)
    if not items and not by_key and initializer is None:
        raise ConfigError("map_reduce of an empty iterable needs an initializer")
    workers = max(1, ac.cluster.total_workers)
    size = chunksize or max(1, -(-len(items) // (4 * workers)))
    deadline = None if timeout is None else time.monotonic() + timeout
    futs = [ac.submit(reduce_chunk, fn, reducer, False, None, by_key, items[i:i + size])
            for i in range(0, len(items), size)]
    fold = PartialFold(reducer, initializer, by_key)
    bar = _bar(len(items)) if progress else None
    uncounted: dict[AsyncTaskFuture, int] = {}  # chunk -> its items, until the bar counts it
    if bar is not None:
        for i, fut in zip(range(0, len(items), size), futs):
            uncounted[fut] = len(items[i:i + size])
            fut.add_done_callback(functools.partial(_count_chunk, bar, uncounted))
    try:
        for fut in futs:
            if deadline is not None and not fut.done():
                await asyncio.wait((fut,), timeout=max(0.0, deadline - time.monotonic()))
                if not fut.done():
                    raise RpycsvcTimeoutError(
                        f"map_reduce did not finish within its timeout of {timeout:g} s")
            fold.add(await fut)
    except BaseException:
        for f in futs:  # one chunk failed, the deadline passed or we were cancelled
            f.cancel()
        raise
    finally:
        if bar is not None:
            for fut in [f for f in uncounted if f.done()]:  # (callbacks not yet run)
                _count_chunk(bar, uncounted, fut)
            bar.close()
    return fold.result


def _count_chunk(bar: Progress, uncounted: dict[AsyncTaskFuture, int],
                 fut: AsyncTaskFuture) -> None:
    """A chunk's items count on the bar once it arrived, in any order: its done-callback
    (run soon after, on the loop), or the sweep before the bar closes, whichever is first."""
    n = uncounted.pop(fut, None)
    if n is not None and not fut.cancelled() and fut.exception() is None:
        bar.update(n, fut.address or "?")


_RETURN_WHEN = (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED)


async def wait(ac: FanOutCluster, futures: Iterable[Awaitable[Any]], timeout: float | None,
               return_when: str) -> tuple[set[Any], set[Any]]:
    """``concurrent.futures.wait``, awaited: ``(done, not_done)`` sets of the given futures
    once ``return_when`` holds or ``timeout`` seconds passed. ``futures`` as in
    :func:`as_completed` (a coroutine is run as a task, and the sets hold that task).
    Cancels nothing: what is not done yet runs on."""
    if return_when not in _RETURN_WHEN:
        raise ConfigError(f"wait(return_when={return_when!r}): use FIRST_COMPLETED, "
                          f"FIRST_EXCEPTION or ALL_COMPLETED (asyncio's or concurrent.futures')")
    loop = ac._rt.bind()
    inbox = ac._rt.inbox
    assert inbox is not None
    given: dict[asyncio.Future, Any] = {}  # what we wait on -> what the caller gave
    for f in dict.fromkeys(futures):  # (each once)
        if isinstance(f, Future):  # a sync TaskFuture: an asyncio future follows it
            af: asyncio.Future = loop.create_future()
            af.add_done_callback(_retrieved)
            inbox.link(af, f)
            given[af] = f
        else:
            af = asyncio.ensure_future(f)
            given[af] = af
    if not given:
        return set(), set()
    done, pending = await asyncio.wait(list(given), timeout=timeout, return_when=return_when)
    return {given[f] for f in done}, {given[f] for f in pending}


def _retrieved(af: asyncio.Future) -> None:
    # The follower of a sync future: its exception is the caller's to read from that future,
    # so asyncio must not log it as "never retrieved".
    if not af.cancelled():
        af.exception()
