"""Array sharing for the joblib backend: a large NumPy argument travels once per server.

The client side is :class:`ArraySharing` (one per backend): :meth:`~ArraySharing.share`
swaps each large array of a batch for an :class:`ArrayRef` and stores the array on every
server first; :meth:`~ArraySharing.end_session` removes what a ``Parallel`` call stored.
The server side is three functions the client sends by reference: :func:`store_array` (a
``.npy`` file in the server's temporary directory, named by a hash of its content),
:func:`drop_session`, and :func:`resolve`, which a worker calls on a batch to turn the
references back into read-only memory maps, raising :class:`ArrayMissing` when its server
lacks the file (the backend then sends that batch with the data inline).

Nothing here imports joblib or NumPy at import time: a server stores arrays without them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

from rpycsvc.client.future import settle as _settle

if TYPE_CHECKING:
    from rpycsvc.client.connection import Client

#: One joblib batch: (function, args, kwargs) per call.
Calls = list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]


# -- on the servers --------------------------------------------------------------------------
class ArrayMissing(Exception):
    """A task's shared array is not on its server (restarted, joined late, store failed);
    the client sends that batch again with the array inline."""


class ArrayRef:
    """What travels in place of a shared array: which file on the server holds it."""

    __slots__ = ("digest", "session")

    def __init__(self, session: str, digest: str) -> None:
        self.session, self.digest = session, digest

    def __reduce__(self) -> tuple[Any, ...]:
        return (ArrayRef, (self.session, self.digest))


def _session_dir(session: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"rpycsvc-joblib-{session}")


def _array_path(session: str, digest: str) -> str:
    return os.path.join(_session_dir(session), f"{digest}.npy")


def store_array(session: str, digest: str, array: Any) -> int:
    """Write ``array`` where this server's workers will find it (runs on the server).

    Written to a temporary name and renamed, so a worker never maps half a file; servers
    sharing a host and a session write the same bytes to the same name, which is harmless.
    Returns the pid that wrote it.
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


def drop_session(session: str) -> None:
    """Remove a finished session's files (runs on the server). Maps already open stay valid."""
    shutil.rmtree(_session_dir(session), ignore_errors=True)


# A worker's open maps, by (session, digest); entries whose file is gone are dropped so a
# removed session's pages are released.
_MAPS: dict[tuple[str, str], Any] = {}
_MAPS_LOCK = threading.Lock()


def _open_array(ref: ArrayRef) -> Any:
    import numpy as np

    key = (ref.session, ref.digest)
    path = _array_path(ref.session, ref.digest)
    with _MAPS_LOCK:
        arr = _MAPS.get(key)
        if arr is None:
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise ArrayMissing(f"shared array {ref.digest} is not on this server") \
                    from None
            _MAPS[key] = arr
    return arr


def _forget_removed_maps() -> None:
    """Close this worker's maps of removed sessions, so their pages can be freed."""
    with _MAPS_LOCK:
        for k in [k for k in _MAPS if not os.path.exists(_array_path(*k))]:
            del _MAPS[k]


def _resolve(value: Any) -> Any:
    return _open_array(value) if isinstance(value, ArrayRef) else value


def resolve(calls: Calls) -> Calls:
    """A batch with its :class:`ArrayRef` arguments opened as read-only memory maps (runs
    in the worker); raises :class:`ArrayMissing` if this server lacks one of them."""
    if _MAPS:
        _forget_removed_maps()
    return [(f, tuple(_resolve(a) for a in args), {k: _resolve(v) for k, v in kwargs.items()})
            for f, args, kwargs in calls]


# -- on the client ---------------------------------------------------------------------------
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


class ArraySharing:
    """One backend's shared arrays: which are stored (or being stored) on the servers, in
    which session; a session ends with the ``Parallel`` call and its files go with it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._digests = _Digests()
        self._session = uuid.uuid4().hex
        self._stored: dict[str, Future] = {}  # digest → done when every server has it

    def forget_digests(self) -> None:
        """Forget the content hashes of arrays seen so far (ids may be reused and arrays
        mutated between ``Parallel`` calls); stored files stay."""
        self._digests.clear()

    def share(self, calls: Calls, threshold: int | None,
              clients: Callable[[], Iterable[Client]]) -> tuple[Calls, Future | None]:
        """``calls`` with every NumPy array argument of ``threshold`` bytes or more replaced
        by an :class:`ArrayRef`, and a future done once every server in ``clients()`` has
        tried to store them (``None`` when nothing is left to wait for: send at once).

        Only arrays passed directly as arguments are shared; object arrays never are.
        """
        if threshold is None:
            return calls, None
        try:
            import numpy as np
        except ImportError:
            return calls, None
        waits: dict[str, Future] = {}

        def swap(value: Any) -> Any:
            if (type(value) is not np.ndarray and not isinstance(value, np.memmap)) \
                    or value.nbytes < threshold or value.dtype.hasobject:
                return value
            digest = self._digests.get(value)
            waits[digest] = self._store(digest, value, session, clients)
            return ArrayRef(session, digest)

        with self._lock:
            session = self._session
        out = [(f, tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()})
               for f, args, kwargs in calls]
        if not waits:
            return calls, None
        pending = [w for w in waits.values() if not w.done()]
        if not pending:
            return out, None
        ready: Future = Future()
        _when_all(pending, lambda: ready.set_result(None))
        return out, ready

    def end_session(self, clients: Callable[[], Iterable[Client]]) -> None:
        """Remove this session's files from the servers (``clients()``, asked only if
        something was stored) and start a new session."""
        with self._lock:
            stored, self._stored = self._stored, {}
            session, self._session = self._session, uuid.uuid4().hex
        self._digests.clear()
        if stored:
            for client in clients():
                try:
                    client.options(mode="thread").submit(drop_session, session)
                except Exception:
                    pass  # closed or lost: its files go with its temporary directory

    def _store(self, digest: str, array: Any, session: str,
               clients: Callable[[], Iterable[Client]]) -> Future:
        """A future done when every server that is up has tried to store ``array``.

        The store runs as a thread-mode task: it writes a file, and must not wait behind
        the process workers' tasks (ours or other clients') before any batch can start.
        """
        with self._lock:
            done = self._stored.get(digest)
            if done is not None:
                return done
            done = self._stored[digest] = Future()
        tries = [_store_on(client, session, digest, array) for client in clients()]
        _when_all(tries, lambda: done.set_result(None))
        return done


def _store_on(client: Client, session: str, digest: str, array: Any) -> Future:
    """Store ``array`` on one server: in a thread-mode task, or in a process worker where
    thread mode is off (``--threads 0``). Done either way, failed or not: a server without
    the file gets its batches with the data inline."""
    done: Future = Future()

    def submit(mode: str) -> Future:
        try:
            return client.options(mode=mode).submit(store_array, session, digest, array)
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
