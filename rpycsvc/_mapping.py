"""``Cluster.map`` and ``Cluster.map_reduce``: lazy, bounded, automatically batched.

Items are taken from the input only as capacity frees up, so an endless generator works
and memory stays bounded. Without an explicit ``chunksize`` the first items go one per
task; as results come back the chunk size adapts so each task carries about
``TARGET_CHUNK_SECONDS`` of work — big enough that per-task overhead vanishes for tiny
functions, small enough that long tasks still spread over every worker.

Two limits, never mixed up: a task option ``timeout`` (``cluster.options(timeout=S)``) is
how long each task may run, enforced by its server; ``run_map``'s ``timeout`` is a deadline
for the whole iteration, as ``Executor.map`` has, enforced here.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import queue
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

from .client import TaskFuture
from .errors import ConfigError, RpycsvcTimeoutError
from .serialization import dumps, dumps_function
from .tracebacks import load_exception

if TYPE_CHECKING:
    from ._jobs import _Job
    from .cluster import Cluster

TARGET_CHUNK_SECONDS = 0.02
MAX_CHUNK = 8192


class _ChunkSizer:
    """Adapts the chunk size to the measured time per item (exponential moving average)."""

    def __init__(self, fixed: int | None, workers: int, total: int | None) -> None:
        if fixed is not None and fixed < 1:
            raise ConfigError(f"chunksize must be >= 1; got {fixed!r}")
        self.fixed = fixed
        self.workers = max(1, workers)
        self.total = total
        self.per_item: float | None = None
        self.size = fixed or 1

    def observe(self, items: int, seconds: float) -> None:
        if self.fixed or items <= 0:
            return
        sample = seconds / items
        self.per_item = sample if self.per_item is None else 0.5 * self.per_item + 0.5 * sample
        want = int(TARGET_CHUNK_SECONDS / max(self.per_item, 1e-7))
        self.size = max(1, min(want, self.size * 4, MAX_CHUNK))

    def next_size(self, taken: int) -> int:
        if self.fixed or self.total is None:
            return self.size
        left = self.total - taken
        # keep every worker busy to the end: never more than a fair share of what's left
        return max(1, min(self.size, -(-left // (2 * self.workers))))


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    try:
        return min(len(x) for x in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


def run_map(cluster: Cluster, fn: Any, iterables: tuple[Iterable[Any], ...], *, ordered: bool,
            chunksize: int | None, timeout: float | None, progress: bool, retries: int,
            opts: dict[str, Any]) -> Iterator[Any]:
    """Validate eagerly (like ``Executor.map``), then return the lazy result iterator.

    ``timeout`` is the deadline for the iteration (from now); ``opts["timeout"]``, if
    any, is each task's limit on its server (tasks then go one item per task unless
    ``chunksize`` is given, when it limits each chunk)."""
    from ._jobs import PIPELINE, _Job

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
        servers = max(1, len(cluster.clients))
        chunksize = max(1, min(64, -(-total // (2 * servers)))) if total else 16
    sizer = _ChunkSizer(chunksize, cluster.total_workers, total)
    label = spec or getattr(fn, "__qualname__", "task")
    window = max(4, 2 * PIPELINE * max(1, cluster.total_workers))
    if threaded:
        window = max(window, cluster.total_threads // max(1, chunksize or 1))
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = None
    if progress:
        from .progress import Progress

        bar = Progress(total)

    def make_job(items: list[tuple[Any, ...]]) -> _Job:
        fut = TaskFuture()
        job = _Job(kind, spec, (*head, *dumps(items, "map arguments")),
                   {**opts, "batch": True, "label": f"{label}[{len(items)}]"}, fut, retries)
        job.size = len(items)
        # abandoning the map (close, an error, a timeout) stops its chunks on the servers too
        fut._stopper = functools.partial(cluster._stop_job, job)
        return job

    def results() -> Iterator[Any]:
        source = zip(*iterables)
        inflight: deque[_Job] = deque()
        done_q: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        taken = 0
        exhausted = False
        try:
            while True:
                while not exhausted and len(inflight) < window:
                    items = list(itertools.islice(source, sizer.next_size(taken)))
                    if not items:
                        exhausted = True
                        break
                    taken += len(items)
                    job = make_job(items)
                    if not ordered:  # (in order, nothing reads the queue: it would keep
                        # every result of the map alive)
                        job.future.add_done_callback(functools.partial(_put, done_q, job))
                    inflight.append(job)
                    cluster._enqueue([job])
                if not inflight:
                    return
                if ordered:
                    job = inflight[0]
                    _wait_future(job.future, deadline)
                    inflight.popleft()
                else:
                    job = _next_done(done_q, deadline)
                    inflight.remove(job)
                sizer.observe(job.size, time.monotonic() - job.sent)
                if bar is not None:
                    bar.update(job.size, job.server.address if job.server else "?")
                address = job.server.address if job.server else None
                pairs = list(job.future.result())
                del job  # (its future holds the chunk's results)
                pairs.reverse()
                while pairs:  # keep no reference to a result once it is yielded
                    if not pairs[-1][0]:
                        raise load_exception(pairs[-1][1], address)
                    yield pairs.pop()[1]
        finally:
            for job in inflight:
                job.future.stop()
            if bar is not None:
                bar.close()

    return results()


def _put(q: queue.SimpleQueue[_Job], job: _Job, _fut: Any) -> None:
    q.put(job)


#: Before Python 3.11 ``Future`` waits raise this, which is not the builtin TimeoutError.
_FUTURE_TIMEOUTS = (TimeoutError, concurrent.futures.TimeoutError)


def _wait_future(fut: Future[Any], deadline: float | None) -> None:
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left <= 0 and not fut.done():
        raise RpycsvcTimeoutError("map: the next result was not ready before the map's "
                                  "deadline (its timeout=)")
    try:
        fut.exception(timeout=left)  # waits; raises only on timeout or cancellation
    except _FUTURE_TIMEOUTS as exc:
        raise RpycsvcTimeoutError("map: the next result was not ready before the map's "
                                  "deadline (its timeout=)") from exc


def _next_done(done_q: queue.SimpleQueue[_Job], deadline: float | None) -> _Job:
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return done_q.get(timeout=left)
    except queue.Empty:
        raise RpycsvcTimeoutError("map: no result arrived before the map's deadline "
                                  "(its timeout=)") from None


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


def run_map_reduce(cluster: Cluster, fn: Any, reducer: Callable[[Any, Any], Any],
                   iterable: Iterable[Any], *, initializer: Any, by_key: bool,
                   chunksize: int | None, timeout: float | None, progress: bool = False) -> Any:
    items = list(iterable)
    if not items and not by_key and initializer is None:
        raise ConfigError("map_reduce of an empty iterable needs an initializer")
    workers = max(1, cluster.total_workers)
    size = chunksize or max(1, -(-len(items) // (4 * workers)))
    bar = None
    if progress:
        from .progress import Progress

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


def _reduce_chunks(cluster: Cluster, fn: Any, reducer: Callable[[Any, Any], Any],
                   items: list[Any], size: int, *, initializer: Any, by_key: bool,
                   timeout: float | None, bar: Any) -> Any:
    # Chunks are never empty, so they reduce without the initializer; it is applied once here.
    futs = [cluster.submit(reduce_chunk, fn, reducer, False, None, by_key, items[i:i + size])
            for i in range(0, len(items), size)]
    if bar is not None:
        for i, fut in enumerate(futs):
            fut.add_done_callback(functools.partial(
                _count_chunk, bar, len(items[i * size:(i + 1) * size])))
    result: Any = {} if by_key else initializer
    first = initializer is None and not by_key
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
            if by_key:
                for key, value in part.items():
                    result[key] = reducer(result[key], value) if key in result else value
            elif first:
                result, first = part, False
            else:
                result = reducer(result, part)
    except BaseException:
        for f in futs:  # one chunk failed (or we gave up): the others are of no use now
            f.stop()
        raise
    return result
