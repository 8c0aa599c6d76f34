"""``AsyncCluster.map``, ``as_completed`` and ``map_reduce``: the sync fan-out, awaited.

``map`` is :func:`rpycsvc.client.mapping.run_map` with its waits turned into awaits: the same
chunk sizer, window and jobs, queued on the same :class:`~rpycsvc.Cluster`; only waiting
differs. It is an async generator, so leaving ``async for`` early (``break``, an exception,
a cancelled task) closes it, and closing it cancels its unfinished chunks, which stops
them on the servers (after a ``break`` asyncio closes it as soon as it is dropped).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Protocol

from rpycsvc.client.jobs import _Job
from rpycsvc.client.mapping import ChunkFeed, ChunkSizer, PartialFold, plan_map, reduce_chunk
from rpycsvc.errors import ConfigError, RpycsvcTimeoutError
from rpycsvc.protocol.mapchunks import chunk_results
from rpycsvc.protocol.tracebacks import load_exception

if TYPE_CHECKING:
    from rpycsvc.client.aio_bridge import AsyncTaskFuture, _Runtime
    from rpycsvc.client.cluster import Cluster


class FanOutCluster(Protocol):
    """What the fan-out needs of an :class:`rpycsvc.AsyncCluster`: its sync cluster, its
    hand-over to the event loop, and sending a task (so this module needs not import it)."""

    _rt: _Runtime

    @property
    def cluster(self) -> Cluster: ...

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> AsyncTaskFuture: ...

    def send(self, afut: AsyncTaskFuture, job: _Job) -> None: ...


def async_map(ac: FanOutCluster, fn: Any, iterables: tuple[Iterable[Any], ...], *,
             ordered: bool, chunksize: int | None, timeout: float | None, retries: int,
             opts: dict[str, Any]) -> AsyncIterator[Any]:
    """Validate eagerly (as the sync ``map``), then return the lazy async iterator."""
    _, sizer, window, make_job = plan_map(ac.cluster._scheduler, fn, iterables,
                                          chunksize=chunksize, retries=retries, opts=opts)
    deadline = None if timeout is None else time.monotonic() + timeout
    return _results(ac, iterables, make_job, sizer, window, ordered, deadline)


async def _results(ac: FanOutCluster, iterables: tuple[Iterable[Any], ...],
                   make_job: Callable[[Sequence[Any]], _Job], sizer: ChunkSizer,
                   window: int, ordered: bool, deadline: float | None) -> AsyncIterator[Any]:
    from rpycsvc.client.aio_bridge import AsyncTaskFuture

    loop = ac._rt.bind()
    feed = ChunkFeed(iterables, sizer, window)
    inflight: deque[AsyncTaskFuture] = deque()
    finished: asyncio.Queue[AsyncTaskFuture] = asyncio.Queue()
    try:
        while True:
            for items in feed.take(len(inflight)):
                afut = AsyncTaskFuture(loop=loop)
                if not ordered:
                    afut.add_done_callback(finished.put_nowait)
                inflight.append(afut)
                ac.send(afut, make_job(items))
            if not inflight:
                return
            until = feed.wait_until()
            if ordered:
                afut = inflight[0]
                if not await _wait_one(afut, deadline, until):
                    continue
                inflight.popleft()
            else:
                got = await _next_done(finished, deadline, until)
                if got is None:
                    continue
                afut = got
                inflight.remove(afut)
            address = afut.address
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
        for afut in inflight:  # abandoned: stopped on the servers too
            afut.cancel()


def _left(deadline: float | None, until: float | None) -> float | None:
    stop = deadline if until is None else until if deadline is None else min(until, deadline)
    return None if stop is None else max(0.0, stop - time.monotonic())


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise RpycsvcTimeoutError("map: the next result was not ready before the map's "
                                  "deadline (its timeout=)")


async def _wait_one(afut: asyncio.Future, deadline: float | None,
                    until: float | None) -> bool:
    """Wait for ``afut``: True once done, False if ``until`` came first; raises
    :class:`RpycsvcTimeoutError` at the map's deadline. Never cancels ``afut`` itself
    (a cancellation of the waiter reaches the map's ``finally``, which does)."""
    if not afut.done():
        await asyncio.wait((afut,), timeout=_left(deadline, until))
    if afut.done():
        return True
    _check_deadline(deadline)
    return False


async def _next_done(finished: asyncio.Queue[AsyncTaskFuture], deadline: float | None,
                     until: float | None) -> AsyncTaskFuture | None:
    """The next finished chunk (unordered map), None if ``until`` came first."""
    if not finished.empty():
        return finished.get_nowait()
    left = _left(deadline, until)
    try:
        return await asyncio.wait_for(finished.get(), left)
    except asyncio.TimeoutError:
        pass
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
                     iterable: Iterable[Any], *, initializer: Any, by_key: bool,
                     chunksize: int | None, timeout: float | None) -> Any:
    """``rpycsvc.client.mapping.run_map_reduce``, awaited: chunks reduce on the servers, the
    partials here in input order (the reducer need not be commutative)."""
    items = list(iterable)
    if not items and not by_key and initializer is None:
        raise ConfigError("map_reduce of an empty iterable needs an initializer")
    workers = max(1, ac.cluster.total_workers)
    size = chunksize or max(1, -(-len(items) // (4 * workers)))
    deadline = None if timeout is None else time.monotonic() + timeout
    futs = [ac.submit(reduce_chunk, fn, reducer, False, None, by_key, items[i:i + size])
            for i in range(0, len(items), size)]
    fold = PartialFold(reducer, initializer, by_key)
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
    return fold.result
