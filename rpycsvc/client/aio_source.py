"""The input of an asyncio map when it is async: read ahead by a task of its own.

``AsyncCluster.map`` takes async iterables (an async generator, a stream of requests),
alone or zipped with plain ones. Their items are read by a :class:`Pump`, a task that keeps
up to a bounded number of them ready, so the map sends whatever has arrived when a chunk may
go: an input that pauses delays only the items it has not produced yet, never the ones it
gave, and the map goes on delivering results (and keeps its deadline) meanwhile. An error
the input raises ends the map after the results of the items it gave before.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from rpycsvc.client.mapping import ChunkFeed, Items

#: Items read ahead of the map at most (the map's window and chunk sizes bound what it
#: takes; this bounds what waits here).
READ_AHEAD = 32768


def async_source(iterables: tuple[Items, ...]) -> AsyncIterator[Any] | None:
    """The map's items if any of its iterables is async (``__aiter__``): one as it is,
    several zipped (plain ones among them too); None if all are plain."""
    if not any(hasattr(it, "__aiter__") for it in iterables):
        return None
    if len(iterables) == 1:
        return _aiter(iterables[0])
    return _azip([_aiter(it) if hasattr(it, "__aiter__") else iter(it)
                  for it in iterables])


def _aiter(iterable: Any) -> AsyncIterator[Any]:
    """``aiter(iterable)`` (a builtin from Python 3.10)."""
    return iterable.__aiter__()


async def _azip(sources: list[Any]) -> AsyncIterator[tuple[Any, ...]]:
    """``zip`` over plain and async iterators: stops at the first one exhausted."""
    while True:
        row = []
        for it in sources:
            try:
                row.append(await it.__anext__() if hasattr(it, "__anext__") else next(it))
            except (StopIteration, StopAsyncIteration):
                return
        yield tuple(row)


class Pump:
    """Reads an async iterator ahead, in a task of its own (started here: call in the
    loop), keeping at most ``limit`` items. ``close()`` stops it (cancelling a read in
    progress, which closes an async generator)."""

    def __init__(self, source: AsyncIterator[Any], limit: int = READ_AHEAD) -> None:
        self._items: deque[Any] = deque()
        self._limit = limit
        self._room = asyncio.Event()
        self._room.set()
        self._arrival: asyncio.Future[None] | None = None
        #: the input ended (or failed: ``error``); what it gave may still wait in ``take``
        self.done = False
        self.error: BaseException | None = None
        #: the map's window had room the last time, but no item had arrived
        self.starved = False
        self._task = asyncio.ensure_future(self._run(source))

    async def _run(self, source: AsyncIterator[Any]) -> None:
        try:
            while True:
                try:
                    item = await source.__anext__()
                except StopAsyncIteration:
                    return
                self._items.append(item)
                self._wake()
                if len(self._items) >= self._limit:
                    self._room.clear()
                    await self._room.wait()
        except Exception as exc:  # the input's own error: the map raises it at the end
            self.error = exc
        finally:
            self.done = True
            self._wake()

    def _wake(self) -> None:
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    def take(self, n: int) -> list[Any]:
        """Up to ``n`` of the items that have arrived (never waits)."""
        items = [self._items.popleft() for _ in range(min(n, len(self._items)))]
        if len(self._items) < self._limit:
            self._room.set()
        return items

    @property
    def exhausted(self) -> bool:
        """Ended, and all it gave was taken."""
        return self.done and not self._items

    def arrival(self) -> asyncio.Future[None]:
        """A future done once an item is ready to take or the input ended."""
        fut = self._arrival
        if fut is None or fut.done():
            fut = self._arrival = asyncio.get_running_loop().create_future()
        if self._items or self.done:
            fut.set_result(None)
        return fut

    def close(self) -> None:
        self._task.cancel()


def take_chunks(feed: ChunkFeed, pump: Pump | None,
                in_flight: int) -> Iterator[Sequence[Any]]:
    """:meth:`ChunkFeed.take`, for an input that may be async: the chunks to send now. An
    async input's chunk holds what has arrived (up to the size the feed asks for); none
    arrived yet leaves ``pump.starved`` set, for the map to wait for one."""
    if pump is None:
        yield from feed.take(in_flight)
        return
    pump.starved = False
    for size in feed.sizes(in_flight):
        items = pump.take(size)
        if items:
            feed.took(len(items))
            yield items
        elif pump.exhausted:
            feed.took(0)  # (the feed is exhausted)
        else:
            pump.starved = True
            return


__all__ = ["READ_AHEAD", "Pump", "async_source", "take_chunks"]
