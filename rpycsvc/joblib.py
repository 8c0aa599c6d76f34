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
import hashlib
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any, Callable

import joblib
from joblib.parallel import AutoBatchingMixin, ParallelBackendBase, SequentialBackend

from .client import Client, TaskFuture
from .client import settle as _settle
from .cluster import Cluster
from .errors import ConfigError, ConnectError

__all__ = ["RpycsvcBackend", "register"]

#: Arrays at least this big (bytes) are sent once per server instead of once per task.
DEFAULT_SHARE_THRESHOLD = 1 << 20

# joblib >= 1.3 has parallel_config; older ones only parallel_backend (same meaning here).
_parallel_config: Callable[..., Any] = getattr(joblib, "parallel_config", None) or \
    joblib.parallel_backend


# -- on the servers --------------------------------------------------------------------------
class _ArrayMissing(Exception):
    """A task's shared array is not on its server (restarted, joined late, store failed);
    the client sends that batch again with the array inline."""


class _ArrayRef:
    """What travels in place of a shared array: which file on the server holds it."""

    __slots__ = ("digest", "session")

    def __init__(self, session: str, digest: str) -> None:
        self.session, self.digest = session, digest

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ArrayRef, (self.session, self.digest))


def _session_dir(session: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"rpycsvc-joblib-{session}")


def _array_path(session: str, digest: str) -> str:
    return os.path.join(_session_dir(session), f"{digest}.npy")


def _store_array(session: str, digest: str, array: Any) -> int:
    """Write ``array`` where this server's workers will find it (runs on the server).

    Written to a temporary name and renamed, so a worker never maps half a file; servers
    sharing a host and a session write the same bytes to the same name, which is harmless.
    """
    import numpy as np

    path = _array_path(session, digest)
    if os.path.exists(path):
        return os.getpid()
    os.makedirs(_session_dir(session), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return os.getpid()


def _drop_session(session: str) -> None:
    """Remove a finished session's files (runs on the server). Maps already open stay valid."""
    shutil.rmtree(_session_dir(session), ignore_errors=True)


# A worker's open maps, by (session, digest); entries whose file is gone are dropped so a
# removed session's pages are released.
_MAPS: dict[tuple[str, str], Any] = {}
_MAPS_LOCK = threading.Lock()


def _open_array(ref: _ArrayRef) -> Any:
    import numpy as np

    key = (ref.session, ref.digest)
    path = _array_path(ref.session, ref.digest)
    with _MAPS_LOCK:
        arr = _MAPS.get(key)
        if arr is None:
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise _ArrayMissing(f"shared array {ref.digest} is not on this server") \
                    from None
            _MAPS[key] = arr
    return arr


def _forget_removed_maps() -> None:
    """Close this worker's maps of removed sessions, so their pages can be freed."""
    with _MAPS_LOCK:
        for k in [k for k in _MAPS if not os.path.exists(_array_path(*k))]:
            del _MAPS[k]


def _resolve(value: Any) -> Any:
    return _open_array(value) if isinstance(value, _ArrayRef) else value


def _run_batch(calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]
               ) -> list[Any]:
    """Run one joblib batch on a worker, nested ``Parallel`` calls sequentially."""
    if _MAPS:
        _forget_removed_maps()
    ready = [(f, tuple(_resolve(a) for a in args), {k: _resolve(v) for k, v in kwargs.items()})
             for f, args, kwargs in calls]
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


class _Digests:
    """id(array) → content hash for arrays seen in this ``Parallel`` call, so an ``X`` that
    joblib passes to every task is hashed once. A weakref guards against id reuse."""

    def __init__(self) -> None:
        self._data: dict[int, tuple[weakref.ref[Any], str]] = {}
        self._lock = threading.Lock()

    def get(self, array: Any) -> str:
        with self._lock:
            entry = self._data.get(id(array))
            if entry is not None and entry[0]() is array:
                return entry[1]
        digest = _digest(array)
        key = id(array)

        def forget(_: Any, key: int = key) -> None:
            self._data.pop(key, None)

        with self._lock:
            self._data[key] = (weakref.ref(array, forget), digest)
        return digest

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


def _digest(array: Any) -> str:
    import numpy as np

    h = hashlib.blake2b(digest_size=20)
    h.update(f"{array.dtype.str}|{array.shape}|{array.flags.f_contiguous}|".encode())
    h.update(np.ascontiguousarray(array).data.cast("B"))
    return h.hexdigest()


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
        self._digests = _Digests()
        self._session = uuid.uuid4().hex
        self._stored: dict[str, Future] = {}  # digest → done when every server has it

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
        self._digests.clear()  # ids may be reused, arrays mutated between calls

    def stop_call(self) -> None:
        self._digests.clear()

    def terminate(self) -> None:
        """End of the ``Parallel`` call (or its ``with`` block): remove its stored arrays."""
        with self._lock:
            stored, self._stored = self._stored, {}
            session, self._session = self._session, uuid.uuid4().hex
        self._digests.clear()
        self.reset_batch_stats()
        if stored and self._cluster is not None:
            for client in self._cluster.clients:
                try:
                    client.options(mode="thread").submit(_drop_session, session)
                except Exception:
                    pass  # closed or lost: its files go with its temporary directory

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
            shared, waits = self._share(calls)
            if not waits:
                self._launch(fut, _run_batch, shared, inline=calls)
            else:
                _when_all(waits, lambda: self._launch(fut, _run_batch, shared, inline=calls))
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

    def _share(self, calls: list[Any]) -> tuple[list[Any], list[Future]]:
        """The calls with large arrays replaced by references, and the stores to wait for."""
        threshold = self.share_threshold
        if threshold is None:
            return calls, []
        try:
            import numpy as np
        except ImportError:
            return calls, []
        waits: dict[str, Future] = {}

        def swap(value: Any) -> Any:
            if (type(value) is not np.ndarray and not isinstance(value, np.memmap)) \
                    or value.nbytes < threshold or value.dtype.hasobject:
                return value
            digest = self._digests.get(value)
            waits[digest] = self._store(digest, value, session)
            return _ArrayRef(session, digest)

        with self._lock:
            session = self._session
        out = [(f, tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()})
               for f, args, kwargs in calls]
        if not waits:
            return calls, []
        return out, [w for w in waits.values() if not w.done()]

    def _store(self, digest: str, array: Any, session: str) -> Future:
        """A future done when every server that is up has tried to store ``array``.

        The store runs as a thread-mode task: it writes a file, and must not wait behind
        the process workers' tasks (ours or other clients') before any batch can start.
        """
        with self._lock:
            done = self._stored.get(digest)
            if done is not None:
                return done
            done = self._stored[digest] = Future()
        tries = [_store_on(client, session, digest, array) for client in self.cluster.clients]
        _when_all(tries, lambda: done.set_result(None))
        return done

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
            if isinstance(exc, _ArrayMissing) and inline is not None:
                self._launch(fut, fn, inline)
                return
            _settle(fut, None if exc else task.result(), exc)

        task.add_done_callback(relay)


def _store_on(client: Client, session: str, digest: str, array: Any) -> Future:
    """Store ``array`` on one server: in a thread-mode task, or in a process worker where
    thread mode is off (``--threads 0``). Done either way, failed or not: a server without
    the file gets its batches with the data inline."""
    done: Future = Future()

    def submit(mode: str) -> Future:
        try:
            return client.options(mode=mode).submit(_store_array, session, digest, array)
        except Exception as exc:
            failed: Future = Future()
            failed.set_exception(exc)
            return failed

    def after_thread(fut: Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            submit("process").add_done_callback(lambda _: _settle(done, None, None))
        else:
            _settle(done, None, None)

    submit("thread").add_done_callback(after_thread)
    return done




def _when_all(futures: list[Future], then: Callable[[], None]) -> None:
    """Call ``then()`` once every future is done (at once if none is left)."""
    left = [len(futures)]
    lock = threading.Lock()
    if not futures:
        then()
        return

    def one_done(_: Future) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            then()

    for f in futures:
        f.add_done_callback(one_done)


def register() -> None:
    """Register the backend with joblib as ``"rpycsvc"`` (done on import)."""
    joblib.register_parallel_backend("rpycsvc", RpycsvcBackend)


register()
