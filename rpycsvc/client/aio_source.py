"""The input of an asyncio map when it is async: read ahead by a task of its own.

``AsyncCluster.map`` takes async iterables (an async generator, a stream of requests),
alone or zipped with plain ones. Their items are read by a :class:`Pump`, a task that reads
only as far as the map's next chunk needs (as the map reads a plain input), so the map goes
on delivering results, and keeps its deadline, while the input is slow. A chunk goes out
full, or with what has arrived once nothing of the map is in flight: an input that pauses
delays the items it gave by at most the chunks already running, and one that yields to the
loop between items still goes out in full chunks. An error the input raises ends the map
after the results of the items it gave before.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from rpycsvc.client.mapping import ChunkFeed, Items


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
    loop), up to :attr:`want` items (what the map's next chunk needs). ``close()`` stops it
    (cancelling a read in progress, which closes an async generator)."""

    def __init__(self, source: AsyncIterator[Any]) -> None:
        self._items: deque[Any] = deque()
        #: how many items the map waits for (it sets it): reading stops there
        self.want = 1
        self._room = asyncio.Event()
        self._room.set()
        self._arrival: asyncio.Future[None] | None = None
        #: the input ended (or failed: ``error``); what it gave may still wait in ``take``
        self.done = False
        self.error: BaseException | None = None
        #: the map's window had room the last time, but not enough items had arrived
        self.starved = False
        #: with nothing in flight, a partial chunk goes at this time (time.monotonic())
        self.partial_at: float | None = None
        self._closing = False
        self._task = asyncio.ensure_future(self._run(source))

    async def _run(self, source: AsyncIterator[Any]) -> None:
        try:
            while True:
                if len(self._items) >= self.want:
                    self._room.clear()
                    await self._room.wait()
                    continue
                try:
                    item = await source.__anext__()
                except StopAsyncIteration:
                    return
                self._items.append(item)
                if len(self._items) >= self.want:
                    self._wake()
        except asyncio.CancelledError as exc:
            if self._closing:
                raise
            self.error = exc  # the input's own (it awaited something cancelled)
        except Exception as exc:  # the input's own error: the map raises it at the end
            self.error = exc
        finally:
            self.done = True
            self._wake()

    def _wake(self) -> None:
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    @property
    def ready(self) -> int:
        """Items arrived, not taken yet."""
        return len(self._items)

    def take(self, n: int) -> list[Any]:
        """Up to ``n`` of the items that have arrived (never waits)."""
        items = [self._items.popleft() for _ in range(min(n, len(self._items)))]
        self._room.set()
        return items

    @property
    def exhausted(self) -> bool:
        """Ended, and all it gave was taken."""
        return self.done and not self._items

    def arrival(self) -> asyncio.Future[None]:
        """A future done once :attr:`want` items are ready to take, or the input ended;
        reading goes on until then."""
        self._room.set()
        fut = self._arrival
        if fut is None or fut.done():
            fut = self._arrival = asyncio.get_running_loop().create_future()
        if len(self._items) >= self.want or self.done:
            fut.set_result(None)
        return fut

    def close(self) -> None:
        self._closing = True
        self._task.cancel()


#: With nothing of the map in flight, how long a chunk waits to fill before it goes with
#: what has arrived: an input that yields to the loop between items still fills chunks,
#: one that pauses delays what it gave by this much at most.
FILL_WAIT = 0.005


def take_chunks(feed: ChunkFeed, pump: Pump | None,
                in_flight: int) -> Iterator[Sequence[Any]]:
    """:meth:`ChunkFeed.take`, for an input that may be async: the chunks to send now. An
    async input's chunk goes once the items the feed asks for have arrived, or with what
    has arrived when nothing else is in flight and :data:`FILL_WAIT` passed; otherwise
    ``pump.starved`` is left set (with ``pump.want`` and ``pump.partial_at``) for the map
    to wait for them."""
    if pump is None:
        yield from feed.take(in_flight)
        return
    pump.starved = False
    for size in feed.sizes(in_flight):
        ready = pump.ready
        now = time.monotonic()
        if ready >= size or pump.done or (
                in_flight == 0 and ready and pump.partial_at is not None
                and now >= pump.partial_at):
            items = pump.take(size)
            feed.took(len(items))  # (none: the input is exhausted, and so is the feed)
            pump.partial_at = None
            if not items:
                return
            in_flight += 1
            yield items
            continue
        pump.starved = True
        pump.want = size
        if in_flight == 0:
            if not ready:
                pump.want = 1  # (the wait to fill starts with the first item)
            elif pump.partial_at is None:
                pump.partial_at = now + FILL_WAIT
        return


__all__ = ["FILL_WAIT", "Pump", "async_source", "take_chunks"]
