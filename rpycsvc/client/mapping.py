"""``Cluster.map`` and ``Cluster.map_reduce``: lazy, bounded, automatically batched.

Items are taken from the input only as capacity frees up, so an endless generator works
and memory stays bounded. Without an explicit ``chunksize`` the first item goes alone; as
chunks finish, the chunk size adapts to the workers' measured service time so each task
carries about ``TARGET_CHUNK_SECONDS`` of work — big enough that per-task overhead
vanishes for tiny functions, small enough that long tasks still spread over every worker
(see :class:`ChunkSizer`).

The result side — waiting for each chunk, in order or as they finish, and the
:class:`~rpycsvc.client.map_results.MapIterator` ``map`` returns (importable from here
too) — is :mod:`rpycsvc.client.map_results`.

Two limits, never mixed up: a task option ``timeout`` (``cluster.options(timeout=S)``) is
how long each task may run, enforced by its server; ``run_map``'s ``timeout`` is a deadline
for the whole iteration, as ``Executor.map`` has, enforced here.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import AsyncIterable, Iterable, Iterator, Sequence
from typing import Any, Callable, NamedTuple, Protocol, Union, cast

from rpycsvc.client.future import TaskFuture
from rpycsvc.client.jobs import PIPELINE, _Job
from rpycsvc.client.map_results import _FUTURE_TIMEOUTS, MapIterator, results_by_chunk
from rpycsvc.client.scheduler import Scheduler
from rpycsvc.errors import ConfigError, RpycsvcTimeoutError
from rpycsvc.protocol.mapchunks import pack_items
from rpycsvc.protocol.serialization import dumps, dumps_function


class _Submitter(Protocol):
    """What ``map_reduce`` needs of a :class:`~rpycsvc.Cluster`: its workers and ``submit``."""

    @property
    def total_workers(self) -> int: ...

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> TaskFuture: ...

TARGET_CHUNK_SECONDS = 0.02
#: What a map takes: plain iterables; the asyncio map takes async ones (``__aiter__``) too.
Items = Union[Iterable[Any], AsyncIterable[Any]]
#: Near the end of a map of known length chunks shrink so every worker stays busy, but not
#: below this much work: smaller ones would cost more in per-task overhead than they save.
MIN_CHUNK_SECONDS = 0.004
#: The most items in a chunk, however cheap they are: each chunk costs a few hops between
#: processes (client, server, worker and back), which on a busy machine each wait for a
#: core; at 8,192 no-ops (about 1 ms of work) those waits, not the work, set a map's pace
#: (issue 15: 32,768 doubled the median rate of a 100,000 no-op map on a loaded 2-core box).
MAX_CHUNK = 32768
#: A chunk's arguments, and its results, stay under this many bytes (as pickled), whatever
#: its items' time: big items or results go in small chunks, so a chunk is never a huge
#: message and a map's read-ahead (its chunks in flight) stays bounded in memory too, not
#: only in items.
MAX_CHUNK_BYTES = 8 << 20
#: A map ramps up (see ChunkSizer.in_flight) for at most this long: then every worker gets
#: a chunk, measured or not (items slower than this go one per chunk anyway).
RAMP_SECONDS = 0.05
#: A chunk grows to at most this many times the largest chunk measured so far: one cheap
#: first item does not make the next chunk thousands of items long at once.
GROWTH = 64
#: Weight of the past in the per-item estimate at each measured chunk (items-weighted).
DECAY = 0.5


class ChunkSizer:
    """How many items the next chunk of a map carries, from the measured service time.

    Without a fixed ``chunksize`` a chunk aims at ``TARGET_CHUNK_SECONDS`` of work on its
    worker. The time per item comes from :meth:`observe`: the seconds the *worker* spent on
    a chunk (its service time, which the server reports), never the chunk's round trip,
    which also counts its wait behind the other chunks in flight. That wait grows with the
    number of servers, and measuring it made chunks tiny on big clusters (issue 15, item 6).
    The estimate is an items-weighted moving average, so a one-item first chunk (whose
    time is mostly the task's fixed cost) weighs little once bigger chunks are measured.

    With a known length, chunks near the end shrink to a fair share of what is left (so
    every worker stays busy to the end) but not below ``MIN_CHUNK_SECONDS`` of work. A chunk
    of big items is cut at ``MAX_CHUNK_BYTES`` (:meth:`pickled` tells their size).

    It also sets how many chunks a map has in flight while it ramps up
    (:meth:`in_flight`): a first chunk alone, then two more per measured chunk, so a map of
    cheap items measures them before it cuts its input into chunks, rather than filling a
    window of one-item chunks per worker. Thread-safe: chunks are measured in the reader
    threads of the connections.
    """

    def __init__(self, fixed: int | None, workers: int, total: int | None) -> None:
        if fixed is not None and fixed < 1:
            raise ConfigError(f"chunksize must be >= 1; got {fixed!r}")
        self.fixed = fixed
        self.workers = max(1, workers)
        self.total = total
        self.per_item: float | None = None
        self.size = fixed or 1
        #: chunks measured so far
        self.measured = 0
        self._work = 0.0  # decayed sums of seconds and of items measured
        self._items = 0.0
        self._largest = 0
        # items under MAX_CHUNK_BYTES, by the last chunk's arguments and results as pickled
        self._most_args = self._most_results = self._most = MAX_CHUNK
        self._lock = threading.Lock()

    def pickled(self, items: int, nbytes: int) -> None:
        """A chunk of ``items`` pickled to ``nbytes`` (before it is sent)."""
        if items > 0:
            self._most_args = _fitting(items, nbytes)
            self._most = min(self._most_args, self._most_results)

    def observe(self, items: int, seconds: float, nbytes: int = 0) -> None:
        """A chunk of ``items`` took its worker ``seconds``; its results came in ``nbytes``
        (0: not known)."""
        if items <= 0:
            return
        if nbytes:
            self._most_results = _fitting(items, nbytes)
            self._most = min(self._most_args, self._most_results)
        with self._lock:
            self.measured += 1
            if self.fixed:
                return
            self._work = self._work * DECAY + max(0.0, seconds)
            self._items = self._items * DECAY + items
            self._largest = max(self._largest, items)
            per_item = max(self._work / self._items, 1e-7)
            self.per_item = per_item
            want = int(TARGET_CHUNK_SECONDS / per_item)
            self.size = max(1, min(want, self._largest * GROWTH, MAX_CHUNK))

    def next_size(self, taken: int) -> int:
        """Items for the next chunk, ``taken`` items of the input being taken already."""
        if self.fixed:
            return self.fixed
        if self.total is None:
            return min(self.size, self._most)
        left = self.total - taken
        fair = -(-left // (2 * self.workers))
        per_item = self.per_item
        floor = int(MIN_CHUNK_SECONDS / per_item) if per_item else 1
        return max(1, min(self.size, self._most, max(fair, floor)))

    def in_flight(self, window: int) -> int:
        """How many chunks may be in flight now, ``window`` being the most once ramped up."""
        per_item = self.per_item
        if self.fixed or (per_item is not None and per_item >= TARGET_CHUNK_SECONDS):
            return window  # (slow items go one per chunk: nothing to measure first)
        return min(window, 1 + 2 * self.measured)


def _fitting(items: int, nbytes: int) -> int:
    """How many items of the size of these ``items`` (``nbytes`` in all) fit a chunk."""
    return max(1, min(MAX_CHUNK, MAX_CHUNK_BYTES * items // max(1, nbytes)))


def _length(iterables: tuple[Items, ...]) -> int | None:
    try:
        return min(len(x) for x in iterables)  # type: ignore[arg-type]
    except (TypeError, OverflowError):  # no len(), or one over sys.maxsize (a huge range)
        return None


class ChunkFeed:
    """The input side of a map's window: takes chunks of items from the input only while
    fewer than the window's chunks are in flight, and ramps up (see :class:`ChunkSizer`).

    The sync map and the asyncio map (:mod:`rpycsvc.client.aio_map`) share it; each sends
    the chunks :meth:`take` yields and waits for results its own way. The input is read
    from the first :meth:`take`: an asyncio map over async iterables never calls it, and
    takes its items itself, in the sizes :meth:`sizes` gives."""

    def __init__(self, iterables: tuple[Items, ...], sizer: ChunkSizer,
                 window: int) -> None:
        # One iterable: its items as they are (no 1-tuples); one ``range``: slices of it,
        # which pickle in a few bytes (see rpycsvc.protocol.mapchunks). Several: zipped.
        first = iterables[0]
        self._range = first if len(iterables) == 1 and type(first) is range else None
        self._iterables = cast("tuple[Iterable[Any], ...]", iterables)
        self._source: Iterator[Any] | None = None  # (made by the first take)
        self._sizer = sizer
        self.window = window
        self.taken = 0
        self.exhausted = False
        #: what the input raised (the map raises it once the items before it are done)
        self.error: BaseException | None = None
        self._ramp_end: float | None = None  # set as the first chunk goes
        self._limit = window

    def sizes(self, in_flight: int) -> Iterator[int]:
        """The sizes of the chunks to send now, given ``in_flight`` chunks already out: for
        each, the caller takes up to that many items, reports them with :meth:`took` and
        sends the chunk before asking for the next size."""
        limit = self.window
        if self._ramp_end is not None and time.monotonic() < self._ramp_end:
            limit = self._sizer.in_flight(self.window)
        self._limit = limit
        while not self.exhausted and in_flight < limit:
            yield self._sizer.next_size(self.taken)
            if self.exhausted:
                break
            in_flight += 1
            if self._ramp_end is None:
                self._ramp_end = time.monotonic() + RAMP_SECONDS
                limit = self._limit = self._sizer.in_flight(self.window)

    def took(self, count: int) -> None:
        """``count`` items went out as a chunk; none: the input is exhausted."""
        if count:
            self.taken += count
        else:
            self.exhausted = True

    def take(self, in_flight: int) -> Iterator[Sequence[Any]]:
        """Chunks to send now, given ``in_flight`` chunks already out: the caller sends each
        (one more in flight) before asking for the next."""
        if self._source is None and self._range is None:
            its = self._iterables
            self._source = iter(its[0]) if len(its) == 1 else zip(*its)
        for size in self.sizes(in_flight):
            items: Sequence[Any]
            if self._range is not None:
                items = self._range[self.taken:self.taken + size]
            else:
                assert self._source is not None
                items = []
                try:  # (extend keeps what came before an error, as a loop would)
                    items.extend(itertools.islice(self._source, size))
                except Exception as exc:  # the input's own error: raised after its results
                    self.error = exc
                    self.exhausted = True
            self.took(len(items))
            if items:
                yield items

    def wait_until(self) -> float | None:
        """How long to wait for a result before taking more: while ramping up (fewer chunks
        in flight than the window allows), only until the ramp ends, then fill the window;
        otherwise (None) until a result comes."""
        if self._limit < self.window and not self.exhausted:
            return self._ramp_end
        return None


class MapPlan(NamedTuple):
    """How a map goes out, whichever API drives it (this one or :mod:`rpycsvc.client.aio_map`):
    the input's length if known, the chunk sizer, how many chunks may be in flight, and
    how a chunk of items becomes a job for the scheduler."""

    total: int | None
    sizer: ChunkSizer
    window: int
    make_job: Callable[[Sequence[Any]], _Job]


def plan_map(scheduler: Scheduler, fn: Any, iterables: tuple[Items, ...], *,
             chunksize: int | None, retries: int, opts: dict[str, Any]) -> MapPlan:
    """Check a map's arguments (eagerly, like ``Executor.map``) and plan how it goes out.

    ``opts["timeout"]``, if any, is each task's limit on its server: tasks then go one item
    per task unless ``chunksize`` is given, when it limits each chunk."""
    if not iterables:
        raise ConfigError("map needs at least one iterable")
    head: tuple[bytes, ...] = ()
    spec: str | None
    if isinstance(fn, str):
        kind, spec = ("path" if ":" in fn else "endpoint"), fn
    else:
        kind, spec, head = "pickled", None, (dumps_function(fn),)
    total = _length(iterables)
    threaded = opts.get("mode") == "thread"
    if chunksize is None and opts.get("timeout") is not None:
        chunksize = 1  # a per-task timeout must time one task, not a batch
    if chunksize is None and threaded:
        # a thread-mode chunk's items run at once on the server: split the work evenly
        servers = max(1, len(scheduler.clients))
        chunksize = max(1, min(64, -(-total // (2 * servers)))) if total else 16
    sizer = ChunkSizer(chunksize, scheduler.total_workers, total)
    label = spec or getattr(fn, "__qualname__", "task")
    window = max(4, 2 * PIPELINE * max(1, scheduler.total_workers))
    if threaded:
        window = max(window, scheduler.total_threads // max(1, chunksize or 1))

    star = len(iterables) > 1
    # Process mode: a chunk as rpycsvc.protocol.mapchunks packs it (option "chunk"). Thread
    # mode runs a chunk's items at once on the server's threads: its "batch" format.
    chunk_opts = {**opts, "batch": True} if threaded else {**opts, "chunk": 1}

    def make_job(items: Sequence[Any]) -> _Job:
        fut = TaskFuture()
        if threaded:
            frames = dumps(list(items) if star else [(x,) for x in items], "map arguments")
        else:
            if kind != "pickled" and type(items) is range:
                # an endpoint may run on a service-only server, which takes plain data only
                # (a range is a global there): its items as a list
                items = list(items)
            frames = dumps(pack_items(items, star), "map arguments")
        sizer.pickled(len(items), sum(memoryview(f).nbytes for f in frames))
        job = _Job(kind, spec, (*head, *frames),
                   {**chunk_opts, "label": f"{label}[{len(items)}]"}, fut, retries)
        job.size = len(items)
        job.observe = sizer.observe  # (measured in the reader thread, as the chunk ends)
        # abandoning the map (close, an error, a timeout) stops its chunks on the servers too
        fut._stopper = functools.partial(scheduler.stop_job, job)
        return job

    return MapPlan(total, sizer, window, make_job)


def run_map(scheduler: Scheduler, fn: Any, iterables: tuple[Iterable[Any], ...], *, ordered: bool,
            chunksize: int | None, timeout: float | None, progress: bool, retries: int,
            opts: dict[str, Any]) -> Iterator[Any]:
    """Validate eagerly (like ``Executor.map``), then return the lazy result iterator.

    ``timeout`` is the deadline for the iteration (from now); ``opts["timeout"]``, if
    any, is each task's limit on its server (see :func:`plan_map`)."""
    _refuse_async("map", iterables)
    total, sizer, window, make_job = plan_map(scheduler, fn, iterables, chunksize=chunksize,
                                              retries=retries, opts=opts)
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = None
    if progress:
        from rpycsvc.client.progress import Progress

        bar = Progress(total)

    feed = functools.partial(ChunkFeed, iterables, sizer, window)
    return MapIterator.over(results_by_chunk(scheduler, feed, make_job, ordered=ordered,
                                             deadline=deadline, bar=bar))


def reduce_chunk(fn: Callable[[Any], Any], reducer: Callable[[Any, Any], Any], has_init: bool,
                 init: Any, by_key: bool, items: list[Any]) -> Any:
    """Runs on the server: map then reduce one chunk, so only the partial travels back."""
    if by_key:
        acc: dict[Any, Any] = {}
        for item in items:
            for key, value in fn(item):
                acc[key] = reducer(acc[key], value) if key in acc else value
        return acc
    mapped = map(fn, items)
    if has_init:
        return functools.reduce(reducer, mapped, init)
    return functools.reduce(reducer, mapped)


def _refuse_async(what: str, iterables: tuple[Any, ...]) -> None:
    """A clear error for an async iterable given to the sync API."""
    for it in iterables:
        if hasattr(it, "__aiter__") and not hasattr(it, "__iter__"):
            raise ConfigError(f"{what} got an async iterable ({type(it).__name__}): use "
                              f"rpycsvc.AsyncCluster.{what}, or pass a plain iterable")


def run_map_reduce(cluster: _Submitter, fn: Any, reducer: Callable[[Any, Any], Any],
                   iterable: Iterable[Any], *, initializer: Any, by_key: bool,
                   chunksize: int | None, timeout: float | None, progress: bool = False) -> Any:
    _refuse_async("map_reduce", (iterable,))
    items = list(iterable)
    if not items and not by_key and initializer is None:
        raise ConfigError("map_reduce of an empty iterable needs an initializer")
    workers = max(1, cluster.total_workers)
    size = chunksize or max(1, -(-len(items) // (4 * workers)))
    bar = None
    if progress:
        from rpycsvc.client.progress import Progress

        bar = Progress(len(items))
    try:
        return _reduce_chunks(cluster, fn, reducer, items, size, initializer=initializer,
                              by_key=by_key, timeout=timeout, bar=bar)
    finally:
        if bar is not None:
            bar.close()


def _count_chunk(bar: Any, n: int, fut: TaskFuture) -> None:
    # a done-callback: the bar counts a chunk's items as soon as it arrives, in any order
    if not fut.cancelled() and fut.exception() is None:
        bar.update(n, fut.address or "?")


def _reduce_chunks(cluster: _Submitter, fn: Any, reducer: Callable[[Any, Any], Any],
                   items: list[Any], size: int, *, initializer: Any, by_key: bool,
                   timeout: float | None, bar: Any) -> Any:
    # Chunks are never empty, so they reduce without the initializer; it is applied once here.
    futs = [cluster.submit(reduce_chunk, fn, reducer, False, None, by_key, items[i:i + size])
            for i in range(0, len(items), size)]
    if bar is not None:
        for i, fut in enumerate(futs):
            fut.add_done_callback(functools.partial(
                _count_chunk, bar, len(items[i * size:(i + 1) * size])))
    fold = PartialFold(reducer, initializer, by_key)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for fut in futs:  # in input order: the reducer need not be commutative
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                part = fut.result(left)
            except _FUTURE_TIMEOUTS as exc:
                if fut.done():  # the chunk itself timed out on its server: its own error
                    raise
                raise RpycsvcTimeoutError(
                    f"map_reduce did not finish within its timeout of {timeout:g} s") from exc
            fold.add(part)
    except BaseException:
        for f in futs:  # one chunk failed (or we gave up): the others are of no use now
            f.stop()
        raise
    return fold.result


class PartialFold:
    """Combines a map_reduce's partial results in input order (the reducer need not be
    commutative): by key (a dict per chunk), or one value, the first partial standing in
    for a missing ``initializer``. The sync and the asyncio map_reduce share it."""

    def __init__(self, reducer: Callable[[Any, Any], Any], initializer: Any,
                 by_key: bool) -> None:
        self._reducer, self._by_key = reducer, by_key
        self.result: Any = {} if by_key else initializer
        self._first = initializer is None and not by_key

    def add(self, part: Any) -> None:
        """Fold in the next chunk's partial result."""
        if self._by_key:
            for key, value in part.items():
                self.result[key] = (self._reducer(self.result[key], value)
                                    if key in self.result else value)
        elif self._first:
            self.result, self._first = part, False
        else:
            self.result = self._reducer(self.result, part)
