"""Views of a cluster: ``cluster.options(...)`` and ``cluster.executor()``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import wait as _wait
from typing import TYPE_CHECKING, Any

from .client import TaskFuture, _check_options

if TYPE_CHECKING:
    from .cluster import Cluster


class _ClusterOptions:
    """``cluster.options(...)``: ``submit`` and ``map`` with these task options. Its
    ``timeout`` is each task's limit, enforced on the server, for ``map`` too."""

    def __init__(self, cluster: Cluster, opts: dict[str, Any], retries: int | None) -> None:
        self._c, self._opts = cluster, opts
        self._retries = cluster.retries if retries is None else retries

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> TaskFuture:
        return self._c._submit(fn, args, kwargs, self._opts, self._retries)

    def map(self, fn: Any, *iterables: Iterable[Any], ordered: bool = True,
            chunksize: int | None = None, timeout: float | None = None,
            progress: bool = False, retries: int | None = None, **opts: Any) -> Iterator[Any]:
        """:meth:`Cluster.map` with these options: each task may run for the options'
        ``timeout`` (:class:`TaskTimeoutError` for that item), while ``timeout`` here is
        the deadline for the whole iteration (:class:`RpycsvcTimeoutError`)."""
        return self._c._map(fn, iterables, ordered=ordered, chunksize=chunksize,
                            timeout=timeout, progress=progress,
                            retries=self._retries if retries is None else retries,
                            opts={**self._opts, **_check_options(opts)})


class ClusterExecutor(Executor):
    """``concurrent.futures.Executor`` over a cluster (``with cluster.executor() as ex:``)."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._futures: set[Future] = set()
        self._shutdown = False

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> TaskFuture:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        fut = self._cluster.submit(fn, *args, **kwargs)
        self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)
        return fut

    def map(self, fn: Any, *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """``Executor.map``: ``timeout`` is the deadline for the whole iteration."""
        return self._cluster.map(fn, *iterables, timeout=timeout, chunksize=chunksize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            for f in list(self._futures):
                f.cancel()
        if wait:
            _wait(list(self._futures))

    def __enter__(self) -> ClusterExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=True)
