"""A joblib backend: ``joblib.Parallel`` and scikit-learn's ``n_jobs`` on an rpycsvc cluster.

``import rpycsvc.joblib`` registers the backend under the name ``"rpycsvc"``::

    import joblib, rpycsvc, rpycsvc.joblib

    with rpycsvc.Cluster.local(2) as cluster:
        with joblib.parallel_config(backend="rpycsvc", cluster=cluster):
            GridSearchCV(SVC(), grid, n_jobs=-1).fit(X, y)

Each batch joblib dispatches becomes one task on the cluster (least busy server first, re-run
elsewhere if its server dies); joblib's auto-batching sizes the batches. On the servers the
batch runs with joblib's default backend set to ``"sequential"``, so a nested ``Parallel``
inside a task stays in its worker instead of forking more processes. When one task raises,
joblib aborts the call and every task still queued or running on the servers is stopped
(queued ones never start, running ones are stopped there: ``TaskFuture.stop()``).

Large NumPy arguments (``share_threshold`` bytes and more, 1 MiB by default, as loky's
``max_nbytes``) that joblib repeats in every task — ``X`` and ``y`` in a grid search — travel
once per server: the first time one is seen it is stored on every server (a ``.npy`` file in
the server's temporary directory, named by a hash of its content, written by a thread-mode
task so that it never waits behind busy process workers), and tasks carry a small reference
that the worker opens as a read-only memory map, as loky does on one machine. A server that
lacks the file (it restarted, joined later, or could not write it) gets that batch with the
data inline instead. The files are removed when the ``Parallel`` call ends (joblib terminates
its backend); a client that dies leaves them in the servers' temporary directories.
Only arrays passed directly as arguments are shared, not arrays inside lists, dicts or
objects.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any, Callable

import joblib
from joblib.parallel import AutoBatchingMixin, ParallelBackendBase, SequentialBackend

from rpycsvc.client.cluster import Cluster
from rpycsvc.client.future import TaskFuture
from rpycsvc.client.future import settle as _settle
from rpycsvc.errors import ConfigError, ConnectError
from rpycsvc.integrations.joblib_arrays import ArrayMissing, ArraySharing, resolve

__all__ = ["RpycsvcBackend", "register"]

#: Arrays at least this big (bytes) are sent once per server instead of once per task.
DEFAULT_SHARE_THRESHOLD = 1 << 20

# joblib >= 1.3 has parallel_config; older ones only parallel_backend (same meaning here).
_parallel_config: Callable[..., Any] = getattr(joblib, "parallel_config", None) or \
    joblib.parallel_backend


# -- on the servers --------------------------------------------------------------------------
def _run_batch(calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]
               ) -> list[Any]:
    """Run one joblib batch on a worker, nested ``Parallel`` calls sequentially (shared
    arrays opened as read-only memory maps first)."""
    ready = resolve(calls)
    with _parallel_config(backend="sequential"):
        return [f(*args, **kwargs) for f, args, kwargs in ready]


def _run_callable(func: Callable[[], Any]) -> Any:
    """A batch joblib did not hand over as ``BatchedCalls``: call it as is."""
    with _parallel_config(backend="sequential"):
        return func()


# -- on the client ---------------------------------------------------------------------------
class _BatchFuture(Future):
    """The future joblib gets for one batch; follows the cluster task (or tasks, after a
    resend) that runs it. ``get`` is the ``AsyncResult`` spelling older joblib calls."""

    def __init__(self) -> None:
        super().__init__()
        self.task: TaskFuture | None = None

    def get(self, timeout: float | None = None) -> Any:
        return self.result(timeout)


_OWNED: dict[Any, Cluster] = {}
_OWNED_LOCK = threading.Lock()


def _shared_cluster(key: Any, make: Callable[[], Cluster]) -> Cluster:
    """One cluster per address list (or the default local one) for this process, closed at
    exit: joblib makes a backend per ``with`` block and tells it nothing when the block ends."""
    with _OWNED_LOCK:
        cluster = _OWNED.get(key)
        if cluster is None:
            cluster = _OWNED[key] = make()
    return cluster


@atexit.register
def _close_owned() -> None:
    with _OWNED_LOCK:
        owned = list(_OWNED.values())
        _OWNED.clear()
    for cluster in owned:
        cluster.close()


class RpycsvcBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's backend API on an rpycsvc :class:`~rpycsvc.Cluster`.

    ``cluster`` is a :class:`~rpycsvc.Cluster` (used as is, never closed here), a list of
    ``"host:port"`` addresses or a hosts file (connected once per process and closed at
    exit), or ``None`` for ``Cluster.local(2)`` started on first use and stopped at exit.
    ``share_threshold`` is the size in bytes from which NumPy arguments are sent once per
    server (``None`` sends everything with every task).
    """

    default_n_jobs = -1  # n_jobs=None (scikit-learn's default) uses the whole cluster
    supports_retrieve_callback = True
    supports_timeout = True
    supports_return_generator = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(self, cluster: Cluster | Iterable[str] | str | None = None, *,
                 share_threshold: int | None = DEFAULT_SHARE_THRESHOLD,
                 nesting_level: int | None = None, inner_max_num_threads: int | None = None,
                 **unknown: Any) -> None:
        if unknown:
            raise ConfigError(f"the rpycsvc joblib backend has no option {sorted(unknown)}; "
                              "it takes cluster= (a Cluster, addresses or a hosts file) "
                              "and share_threshold= (bytes, or None)")
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads)
        if share_threshold is not None and share_threshold < 0:
            raise ConfigError(f"share_threshold must be >= 0 bytes or None; got "
                              f"{share_threshold!r}")
        self._cluster: Cluster | None = None
        self._addresses: str | tuple[str, ...] | None = None  # to connect on first use
        if isinstance(cluster, Cluster):
            self._cluster = cluster
        elif isinstance(cluster, str) or cluster is None:
            self._addresses = cluster
        else:
            try:
                self._addresses = tuple(cluster)
            except TypeError:
                raise ConfigError(f"cluster= takes a rpycsvc.Cluster, a list of 'host:port' "
                                  f"addresses or a hosts file; got {cluster!r}") from None
            if not self._addresses:
                raise ConfigError("cluster= got an empty list of addresses")
        self.share_threshold = share_threshold
        self._lock = threading.Lock()
        self._pending: set[_BatchFuture] = set()
        self._arrays = ArraySharing()

    # -- the cluster ---------------------------------------------------------------------------
    @property
    def cluster(self) -> Cluster:
        """The cluster this backend runs on (connected or started on first use)."""
        if self._cluster is None:
            key = self._addresses
            if key is None:
                self._cluster = _shared_cluster(None, Cluster.local)
            else:
                self._cluster = _shared_cluster(key, lambda: Cluster(key))
        return self._cluster

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """``n_jobs`` as asked, with ``-1`` (or ``None``) meaning every process worker of
        the servers that are up now, ``-2`` all but one, and so on, as joblib counts CPUs.

        Only an explicit ``n_jobs=1`` gives 1, which joblib runs here, in this process
        (scikit-learn's "no parallelism"); a negative ``n_jobs`` on a cluster of one worker
        gives 2 so that the work still goes to the server.
        """
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs == 1:
            return 1
        workers = self.cluster.total_workers
        if workers < 1:
            raise ConnectError(f"no server of {self.cluster!r} is up to run joblib tasks "
                               f"(unreachable: {self.cluster.unreachable or 'none listed'})")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            return max(workers + 1 + n_jobs, 2)
        return n_jobs

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, prefer: Any = None,
                  require: Any = None, **backend_kwargs: Any) -> int:
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def get_nested_backend(self) -> tuple[ParallelBackendBase, int | None]:
        """Tasks on the servers run nested ``Parallel`` calls sequentially in their worker."""
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None

    # -- a Parallel call -----------------------------------------------------------------------
    def start_call(self) -> None:
        self._arrays.forget_digests()  # ids may be reused, arrays mutated between calls

    def stop_call(self) -> None:
        self._arrays.forget_digests()

    def terminate(self) -> None:
        """End of the ``Parallel`` call (or its ``with`` block): remove its stored arrays."""
        cluster = self._cluster  # not started just to clean up
        self._arrays.end_session(lambda: cluster.clients if cluster is not None else [])
        self.reset_batch_stats()

    def submit(self, func: Any, callback: Callable[[Any], Any] | None = None) -> _BatchFuture:
        """Run one joblib batch on the cluster; ``callback(future)`` runs when it is done."""
        fut = _BatchFuture()
        if callback is not None:
            fut.add_done_callback(callback)
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._forget)
        try:
            calls = getattr(func, "items", None)
            if calls is None:
                self._launch(fut, _run_callable, func)
                return fut
            calls = list(calls)
            shared, stored = self._arrays.share(calls, self.share_threshold,
                                                lambda: self.cluster.clients)
            if stored is None:
                self._launch(fut, _run_batch, shared, inline=calls)
            else:
                stored.add_done_callback(
                    lambda _: self._launch(fut, _run_batch, shared, inline=calls))
        except BaseException as exc:
            _settle(fut, None, exc)
        return fut

    apply_async = submit  # joblib < 1.3 calls it this

    def retrieve_result_callback(self, out: Future) -> Any:
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel every batch of this backend: queued ones never start, running ones are
        stopped on their servers (their workers are replaced)."""
        with self._lock:
            pending, self._pending = list(self._pending), set()
        for fut in pending:
            task = fut.task
            fut.cancel()
            if task is not None:
                task.stop()

    # -- internals -----------------------------------------------------------------------------
    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._pending.discard(fut)

    def _launch(self, fut: _BatchFuture, fn: Any, payload: Any,
                inline: list[Any] | None = None) -> None:
        """Submit ``fn(payload)`` for ``fut``; a batch whose server lacks a shared array is
        sent once more with ``inline`` (the calls as joblib gave them)."""
        if fut.done():  # aborted while its arrays were being stored
            return
        try:
            task = self.cluster.submit(fn, payload)
        except BaseException as exc:
            _settle(fut, None, exc)
            return
        fut.task = task
        if fut.cancelled():  # aborted while we were submitting: abort_everything missed it
            task.stop()
            return

        def relay(task: Future) -> None:
            if task.cancelled():
                fut.cancel()
                return
            exc = task.exception()
            if isinstance(exc, ArrayMissing) and inline is not None:
                self._launch(fut, fn, inline)
                return
            _settle(fut, None if exc else task.result(), exc)

        task.add_done_callback(relay)


def register() -> None:
    """Register the backend with joblib as ``"rpycsvc"`` (done on import)."""
    joblib.register_parallel_backend("rpycsvc", RpycsvcBackend)


register()
