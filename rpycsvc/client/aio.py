"""The asyncio API: :class:`AsyncCluster`, :class:`AsyncClient` and :func:`aconnect`.

The same client as the sync API, awaited instead of waited on::

    async with rpycsvc.AsyncCluster.local(2) as cluster:
        print(await cluster.submit(pow, 2, 10))
        async for square in cluster.map(pow, range(10), [2] * 10):
            print(square)

How it works, and why the event loop never blocks on the network:

- A task is sent as in the sync API (:meth:`rpycsvc.Cluster.submit`), from the loop's thread,
  in the way a connection's reader thread sends: the message is written at once only if
  the socket has room, else handed to the connection's writer thread. Its answer arrives
  in the connection's reader thread, which settles the task's ``TaskFuture``; a callback
  then hands it to the loop. Hand-overs are batched: one loop wake-up carries every result
  that arrived meanwhile (no thread per task, no wake-up per result under load).
- A task whose arguments are large (over :data:`INLINE_BYTES` pickled) may have to wait
  for room in the server (``max_held``): it is pickled and sent by a private sender thread
  instead, so that wait happens there.
- Control calls (connecting, ``stats()``, ``ping()``, closing, which are RPyC calls that
  wait for their answer) run on a small private thread pool, never on the loop's thread.
- Cancelling what awaits a task (``asyncio.wait_for``'s or ``asyncio.timeout``'s deadline,
  ``task.cancel()``, a cancelled ``gather`` or ``TaskGroup``) cancels its future, and that
  stops the task on its server as :meth:`rpycsvc.TaskFuture.stop` does: a queued task is
  dropped, a running one's worker is killed and replaced. (A ``gather`` whose task fails
  cancels nothing: its other tasks run on.)

``map``, ``as_completed`` and ``map_reduce`` are in :mod:`rpycsvc.client.aio_map`; the hand-over of
results to the loop and the sending without waiting in :mod:`rpycsvc.client.aio_bridge`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Generator, Iterable
from typing import TYPE_CHECKING, Any, Callable

from rpycsvc.client.aio_bridge import (
    INLINE_BYTES,
    AsyncTaskFuture,
    _looks_big,
    _nbytes,
    _Runtime,
    _send_nowait,
)
from rpycsvc.client.calls import frames_of_call, settle_reply
from rpycsvc.client.cluster import BroadcastResult, Cluster
from rpycsvc.client.connect import connect
from rpycsvc.client.connection import Client, _label
from rpycsvc.client.future import TaskFuture, settle
from rpycsvc.client.jobs import _Job
from rpycsvc.client.taskoptions import check_options
from rpycsvc.errors import RpycsvcError, RpycsvcTimeoutError, ServerLostError

if TYPE_CHECKING:
    from rpycsvc.client.mapping import Items


class AsyncClient:
    """One server's connection, awaited: ``submit`` returns an :class:`AsyncTaskFuture`,
    ``stats()``/``ping()``/``close()`` are coroutines (run off the loop's thread).

    Make one with :func:`aconnect`; a cluster's are in :attr:`AsyncCluster.clients`.
    ``client`` is the sync :class:`~rpycsvc.Client` underneath (classic access and the
    rest of the sync API)."""

    def __init__(self, client: Client, runtime: _Runtime, *, owned: bool = False) -> None:
        self.client = client
        self._rt = runtime
        self._owned = owned  # made by aconnect: close() closes the connection and our threads
        self._defaults = dict(client._defaults)

    @property
    def address(self) -> str:
        return self.client.address

    @property
    def workers(self) -> int:
        return self.client.workers

    @property
    def threads(self) -> int:
        return self.client.threads

    @property
    def server_info(self) -> dict[str, Any]:
        return self.client.server_info

    @property
    def closed(self) -> bool:
        return self.client.closed

    def options(self, **opts: Any) -> _ClientOptions:
        """The same ``submit`` with task options (``timeout``, ``mode``, ``output``)."""
        return _ClientOptions(self, {**self._defaults, **check_options(opts)})

    def submit(self, task: Any, /, *args: Any, **kwargs: Any) -> AsyncTaskFuture:
        """Start ``task(*args, **kwargs)`` on the server; ``await`` the future for its
        result. Call it in the event loop's thread."""
        return self._submit(task, args, kwargs, self._defaults)

    async def compute(self, task: Any, *args: Any, **kwargs: Any) -> Any:
        """``await client.compute(fn, *args)``: run it on the server, return its result."""
        return await self.submit(task, *args, **kwargs)

    def _submit(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                opts: dict[str, Any]) -> AsyncTaskFuture:
        loop = self._rt.bind()
        afut = AsyncTaskFuture(loop=loop)
        c = self.client
        if _looks_big(args, kwargs):
            self._rt.start(afut, functools.partial(c._submit, task, args, kwargs, opts))
            return afut
        kind, spec, frames = frames_of_call(task, args, kwargs)
        if _nbytes(frames) > INLINE_BYTES:
            self._rt.start(afut, functools.partial(self._send, kind, spec, frames, task, opts))
            return afut
        tf = _send_nowait(functools.partial(self._send, kind, spec, frames, task, opts))
        afut.task_future = tf
        inbox = self._rt.inbox
        assert inbox is not None
        inbox.link(afut, tf)
        return afut

    def _send(self, kind: str, spec: Any, frames: tuple[Any, ...], task: Any,
              opts: dict[str, Any]) -> TaskFuture:
        """Send pickled ``frames`` as one task (as ``Client._submit`` does)."""
        c = self.client
        tf = TaskFuture()
        tf.address = c.address

        def done(status: str, value: Any) -> None:
            if status == "lost":
                settle(tf, None, value)
            else:
                settle_reply(tf, value, c.address)

        tf.set_running_or_notify_cancel()
        key = c.start_task(kind, spec, {**opts, "label": _label(task, spec)}, frames, done, tf)
        tf._stopper = functools.partial(c.cancel_task, key)
        return tf

    async def stats(self) -> dict[str, Any]:
        """The server's stats (an RPyC call: made off the loop's thread)."""
        return await self._rt.call(self.client.stats)

    async def ping(self) -> None:
        """One round trip to the server (off the loop's thread)."""
        await self._rt.call(self.client.ping)

    async def close(self) -> None:
        """Close the connection (tasks in flight fail with ``ServerLostError``)."""
        if self._rt.closed:  # closed already (or its cluster is)
            return
        await self._rt.call(self.client.close)
        if self._owned:
            self._rt.shutdown()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<rpycsvc.AsyncClient {self.address} {'closed' if self.closed else 'open'}>"


class _ClientOptions:
    def __init__(self, client: AsyncClient, opts: dict[str, Any]) -> None:
        self._client, self._opts = client, opts

    def submit(self, task: Any, /, *args: Any, **kwargs: Any) -> AsyncTaskFuture:
        return self._client._submit(task, args, kwargs, self._opts)


async def aconnect(host: str = "127.0.0.1", port: int | None = None, **kwargs: Any
                   ) -> AsyncClient:
    """``await rpycsvc.aconnect("host:port")``: :func:`rpycsvc.connect` without blocking
    the event loop (the connection is made on a private thread). Same arguments."""
    rt = _Runtime()
    try:
        c = await rt.call(functools.partial(connect, host, port, **kwargs))
    except BaseException:
        rt.shutdown()
        raise
    return AsyncClient(c, rt, owned=True)


class AsyncCluster:
    """Several servers as one pool, awaited: ``await cluster.submit(fn, x)``, ``async for r
    in cluster.map(fn, items)``, ``await cluster.map_reduce(...)``, ``await cluster.stats()``.

    The arguments are :class:`rpycsvc.Cluster`'s. Nothing connects until ``async with
    AsyncCluster(...) as cluster:`` (or ``cluster = await AsyncCluster(...)``; then ``await
    cluster.close()``); :meth:`local` starts servers on this machine the same way, and
    :meth:`from_cluster` wraps a sync cluster you have. ``cluster.cluster`` is the sync
    :class:`~rpycsvc.Cluster` underneath, once started.
    """

    def __init__(self, servers: Iterable[str] | str | None = None, **kwargs: Any) -> None:
        self._rt = _Runtime()
        self._make: Callable[[], Cluster] | None = None
        if servers is not None:
            self._make = functools.partial(Cluster, servers, **kwargs)
        self._cluster: Cluster | None = None
        self._owns = True
        self._closed = False

    @classmethod
    def local(cls, n: int = 2, **kwargs: Any) -> AsyncCluster:
        """``n`` servers on this machine, as :meth:`rpycsvc.Cluster.local` (same keywords),
        started on entering ``async with`` (off the loop's thread), stopped on close."""
        self = cls()
        self._make = functools.partial(Cluster.local, n, **kwargs)
        return self

    @classmethod
    def from_cluster(cls, cluster: Cluster, *, close: bool = False) -> AsyncCluster:
        """The async API over a sync ``cluster`` you made (e.g. to use both); closing this
        one closes ``cluster`` only if ``close``."""
        self = cls()
        self._cluster, self._owns = cluster, close
        return self

    async def start(self) -> AsyncCluster:
        """Connect (or start the local servers): what ``async with`` and ``await`` do."""
        self._rt.bind()
        if self._cluster is None:
            if self._make is None or self._closed:
                raise RpycsvcError("this AsyncCluster is closed" if self._closed else
                                   "AsyncCluster needs server addresses (or use .local(n))")
            self._cluster = await self._rt.call(self._make)
        return self

    def __await__(self) -> Generator[Any, None, AsyncCluster]:
        return self.start().__await__()

    async def __aenter__(self) -> AsyncCluster:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """As :meth:`rpycsvc.Cluster.close` (unfinished tasks are cancelled on the servers,
        servers we started are stopped), off the loop's thread."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._cluster is not None and self._owns:
                await self._rt.call(self._cluster.close)
        finally:
            self._rt.shutdown()

    @property
    def cluster(self) -> Cluster:
        """The sync :class:`~rpycsvc.Cluster` this one drives."""
        if self._cluster is None:
            raise RpycsvcError("this AsyncCluster is not started: use 'async with "
                               "AsyncCluster(...) as cluster:' or 'await AsyncCluster(...)'")
        return self._cluster

    # -- as the sync API -------------------------------------------------------------------------
    @property
    def clients(self) -> list[AsyncClient]:
        """The connections that are up now, as :class:`AsyncClient`."""
        return [AsyncClient(c, self._rt) for c in self.cluster.clients]

    @property
    def addresses(self) -> list[str]:
        return self.cluster.addresses

    @property
    def unreachable(self) -> dict[str, BaseException]:
        return self.cluster.unreachable

    @property
    def total_workers(self) -> int:
        return self.cluster.total_workers

    @property
    def total_threads(self) -> int:
        return self.cluster.total_threads

    def __len__(self) -> int:
        return len(self.cluster)

    def __repr__(self) -> str:
        inner = repr(self._cluster) if self._cluster is not None else "not started"
        return f"<rpycsvc.AsyncCluster {inner}>"

    async def stats(self) -> dict[str, dict[str, Any] | BaseException]:
        """Each server's stats, or the exception for a server that is down (off the loop)."""
        return await self._rt.call(self.cluster.stats)

    def options(self, **opts: Any) -> _AsyncClusterOptions:
        """The same ``submit``/``map`` with task options (``timeout`` per task, ``mode``,
        ``output``, ``retries``), as :meth:`rpycsvc.Cluster.options`."""
        retries = opts.pop("retries", None)
        cl = self.cluster
        return _AsyncClusterOptions(self, {**cl._defaults, **check_options(opts)},
                                    cl.retries if retries is None else retries)

    # -- submitting ------------------------------------------------------------------------------
    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> AsyncTaskFuture:
        """Run ``fn(*args, **kwargs)`` on the least busy server: ``await`` the returned
        future for its result; cancelling it (or what awaits it) stops the task on its
        server. Call it in the event loop's thread."""
        cl = self.cluster
        return self._submit(fn, args, kwargs, cl._defaults, cl.retries)

    def _submit(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                opts: dict[str, Any], retries: int, pinned: str | None = None
                ) -> AsyncTaskFuture:
        loop = self._rt.bind()
        cl = self.cluster
        afut = AsyncTaskFuture(loop=loop)
        if _looks_big(args, kwargs):
            self._rt.start(afut, functools.partial(
                cl._scheduler.submit, fn, args, kwargs, opts, retries, pinned))
            return afut
        job = self._job(fn, args, kwargs, opts, retries, pinned)
        self.send(afut, job)
        return afut

    def _job(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             opts: dict[str, Any], retries: int, pinned: str | None = None) -> _Job:
        """One task, pickled, as the cluster queues it (as ``Cluster._submit`` makes it)."""
        kind, spec, frames = frames_of_call(fn, args, kwargs)
        label = spec if spec else getattr(fn, "__qualname__", "task")
        tf = TaskFuture()
        job = _Job(kind, spec, frames, {**opts, "label": label}, tf, retries, pinned)
        tf._stopper = functools.partial(self.cluster._scheduler.stop_job, job)
        return job

    def send(self, afut: AsyncTaskFuture, job: _Job) -> None:
        """Queue ``job`` on the cluster (sending it at once if a server has room), ``afut``
        following its future: from the loop's thread if it is small, else from the
        sender thread (which may wait for room in the server)."""
        cl = self.cluster
        if _nbytes(job.frames) > INLINE_BYTES:
            def make() -> TaskFuture:
                cl._scheduler.enqueue([job])
                return job.future
            self._rt.start(afut, make)
            return
        afut.task_future = job.future
        inbox = self._rt.inbox
        assert inbox is not None
        inbox.link(afut, job.future)
        _send_nowait(functools.partial(cl._scheduler.enqueue, [job]))

    async def broadcast(self, fn: Any, /, *args: Any, timeout: float | None = None,
                        **kwargs: Any) -> BroadcastResult:
        """Run ``fn(*args, **kwargs)`` once on every server that takes tasks, as
        :meth:`rpycsvc.Cluster.broadcast`: address → result or exception. ``timeout``: one
        deadline for all (a server late by then gets :class:`RpycsvcTimeoutError` and its
        task is stopped there)."""
        cl = self.cluster
        targets = cl._scheduler.usable_addresses()
        futs = {a: self._submit(fn, args, kwargs, cl._defaults, 0, pinned=a) for a in targets}
        if futs:
            await asyncio.wait(list(futs.values()), timeout=timeout)
        out = BroadcastResult()
        for addr, f in futs.items():
            if not f.done():
                f.cancel()  # on the server too
                out[addr] = RpycsvcTimeoutError(
                    f"{addr} did not answer within {timeout:g} s; the task was stopped there")
            elif f.exception() is not None:
                out[addr] = f.exception()
            else:
                out[addr] = f.result()
        for addr, srv in cl._scheduler.servers.items():
            if addr not in out:
                cause = srv.cause()
                out[addr] = cause if isinstance(cause, BaseException) else ServerLostError(
                    f"{addr} is {cause}", address=addr)
        return out

    # -- fan-out (rpycsvc.client.aio_map) ------------------------------------------------------
    def map(self, fn: Any, *iterables: Items, ordered: bool = True,
            chunksize: int | None = None, timeout: float | None = None,
            progress: bool = False, retries: int | None = None,
            **opts: Any) -> AsyncIterator[Any]:
        """``async for result in cluster.map(fn, items)``: as :meth:`rpycsvc.Cluster.map`
        (lazy, bounded, chunked automatically; in input order unless ``ordered=False``).
        Results stream as their chunks finish. ``iterables`` may be async (an async
        generator, a stream of requests), alone or zipped with plain ones: their items are
        awaited as chunks go out. Leaving the loop early (``break``, an exception, a
        cancelled task) stops the map's unfinished chunks on the servers.
        ``timeout`` is a deadline for the whole iteration (:class:`RpycsvcTimeoutError`);
        ``asyncio.timeout``/``wait_for`` around the loop work as well. ``progress`` shows
        the sync map's bar (a redrawn line on a terminal, a widget in Jupyter, else one
        summary line at the end) while the ``async for`` runs."""
        from rpycsvc.client.aio_map import async_map

        cl = self.cluster
        return async_map(self, fn, iterables, ordered=ordered, chunksize=chunksize,
                        timeout=timeout, retries=cl.retries if retries is None else retries,
                        opts={**cl._defaults, **check_options(opts)}, progress=progress)

    def as_completed(self, futures: Iterable[Awaitable[Any]], timeout: float | None = None
                     ) -> AsyncIterator[asyncio.Future]:
        """``async for fut in cluster.as_completed(futures)``: each future once it is done
        (``fut.result()``), first finished first. ``timeout`` bounds the whole iteration."""
        from rpycsvc.client.aio_map import as_completed

        return as_completed(self, futures, timeout)

    async def wait(self, futures: Iterable[Awaitable[Any]], timeout: float | None = None,
                   return_when: str = "ALL_COMPLETED") -> tuple[set[Any], set[Any]]:
        """``done, not_done = await cluster.wait(futures)``: as :meth:`rpycsvc.Cluster.wait`
        (``concurrent.futures.wait``): once all are done (``ALL_COMPLETED``), the first is
        (``FIRST_COMPLETED``) or one raised (``FIRST_EXCEPTION``), or ``timeout`` seconds
        passed. ``futures``: this API's futures, other asyncio futures or tasks, coroutines
        (run as tasks: the sets hold those tasks) or sync ``TaskFuture`` objects. Nothing is
        cancelled: futures not done go on running (cancel them to stop them)."""
        from rpycsvc.client.aio_map import wait

        return await wait(self, futures, timeout, return_when)

    async def map_reduce(self, fn: Any, reducer: Callable[[Any, Any], Any],
                         iterable: Items, *, initializer: Any = None,
                         by_key: bool = False, chunksize: int | None = None,
                         timeout: float | None = None, progress: bool = False) -> Any:
        """As :meth:`rpycsvc.Cluster.map_reduce`: each server reduces its chunks and only
        the partials travel back. A failed chunk, the deadline or a cancellation stops the
        other chunks on the servers. ``progress`` shows the bar as :meth:`map` does."""
        from rpycsvc.client.aio_map import map_reduce

        return await map_reduce(self, fn, reducer, iterable, initializer=initializer,
                                by_key=by_key, chunksize=chunksize, timeout=timeout,
                                progress=progress)


class _AsyncClusterOptions:
    """``cluster.options(timeout=5)``: ``submit`` and ``map`` with these task options."""

    def __init__(self, cluster: AsyncCluster, opts: dict[str, Any], retries: int) -> None:
        self._cluster, self._opts, self._retries = cluster, opts, retries

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> AsyncTaskFuture:
        return self._cluster._submit(fn, args, kwargs, self._opts, self._retries)

    def map(self, fn: Any, *iterables: Items, ordered: bool = True,
            chunksize: int | None = None, timeout: float | None = None,
            progress: bool = False) -> AsyncIterator[Any]:
        from rpycsvc.client.aio_map import async_map

        return async_map(self._cluster, fn, iterables, ordered=ordered, chunksize=chunksize,
                        timeout=timeout, retries=self._retries, opts=self._opts,
                        progress=progress)


__all__ = ["AsyncClient", "AsyncCluster", "AsyncTaskFuture", "aconnect"]
