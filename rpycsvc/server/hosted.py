"""Objects that live on the server: shared queues and user classes (``--service``).

Queues hold pickled items (bytes), so what one client puts is a value, not a netref into
that client: it stays valid when the client disconnects, and any number of clients on any
host can put and get at once. Hosted objects are user classes (``module:Class``)
instantiated once per server or once per connection and reached as ``conn.root.<name>``;
their public methods are called through RPyC, like Pyro's remote objects.
"""

from __future__ import annotations

import importlib
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from rpycsvc.errors import ConfigError, RpycsvcTimeoutError

SCOPES = ("server", "connection")


class HostedQueue:
    """A FIFO of pickled items on the server. Plain RPyC clients may put/get brine values
    (numbers, strings, bytes, tuples); :class:`rpycsvc.Queue` puts any picklable object."""

    def __init__(self, name: str, maxsize: int = 0) -> None:
        self.name = name
        self._q: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize)

    def exposed_put(self, item: Any, timeout: float | None = None) -> None:
        """Put a plain value (tuples of numbers/strings/bytes). Blocks while full."""
        _check_brine(item)
        self._put((False, item), timeout)

    def exposed_put_frames(self, frames: tuple[bytes, ...], timeout: float | None = None) -> None:
        self._put((True, tuple(bytes(f) for f in frames)), timeout)

    def _put(self, entry: tuple[bool, Any], timeout: float | None) -> None:
        try:
            self._q.put(entry, timeout=timeout)
        except queue.Full:
            raise TimeoutError(f"queue {self.name!r} stayed full for {timeout} s") from None

    def exposed_get_entry(self, timeout: float | None = None) -> tuple[bool, Any]:
        """``(pickled, value)``: the next entry, as :class:`rpycsvc.Queue` reads it."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"queue {self.name!r} stayed empty for {timeout} s") from None

    def exposed_get(self, timeout: float | None = None) -> Any:
        """The next item for a plain RPyC client (raises if it was put pickled)."""
        pickled, value = self.exposed_get_entry(timeout)
        if pickled:
            raise TypeError("this item was put by rpycsvc.Queue; read it with rpycsvc.Queue")
        return value

    def exposed_qsize(self) -> int:
        return self._q.qsize()

    def exposed_empty(self) -> bool:
        return self._q.empty()


def _check_brine(item: Any) -> None:
    from rpyc.core import brine

    if not brine.dumpable(item):
        raise TypeError(
            f"a plain RPyC client can put only numbers, strings, bytes and tuples of those "
            f"(got {type(item).__name__}); use rpycsvc.Queue(conn, name) for any picklable value"
        )


class QueueRegistry:
    """Named queues of one server, created on first use."""

    def __init__(self) -> None:
        self._queues: dict[str, HostedQueue] = {}
        self._lock = threading.Lock()

    def get(self, name: str, maxsize: int = 0) -> HostedQueue:
        if not isinstance(name, str) or not name:
            raise ValueError(f"queue name must be a non-empty string; got {name!r}")
        with self._lock:
            q = self._queues.get(name)
            if q is None:
                q = self._queues[name] = HostedQueue(name, maxsize)
            return q

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._queues)


@dataclass
class HostedSpec:
    """One ``--service module:Class[=name]``: how to make the object and how often."""

    name: str
    factory: Callable[[], Any]
    scope: str
    instance: Any = None

    def get(self, per_connection: dict[str, Any]) -> Any:
        if self.scope == "connection":
            if self.name not in per_connection:
                per_connection[self.name] = self.factory()
            return per_connection[self.name]
        if self.instance is None:
            self.instance = self.factory()
        return self.instance


def load_services(specs: list[str], scope: str = "server") -> dict[str, HostedSpec]:
    """Parse and import ``module:Class[=name]`` specs; the name defaults to the class name
    in lower case. Raises :class:`ConfigError` naming the bad spec."""
    if scope not in SCOPES:
        raise ConfigError(f"--service-scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    table: dict[str, HostedSpec] = {}
    for spec in specs:
        path, _, name = spec.partition("=")
        modname, sep, attr = path.partition(":")
        if not sep or not modname or not attr:
            raise ConfigError(f"--service {spec!r}: write it as module:Class or module:Class=name")
        try:
            factory = getattr(importlib.import_module(modname), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"--service {spec!r}: {type(exc).__name__}: {exc}") from exc
        if not callable(factory):
            raise ConfigError(f"--service {spec!r}: {attr} is not a class or factory")
        key = name or attr.lower()
        if not key.isidentifier():
            raise ConfigError(f"--service {spec!r}: {key!r} is not a valid attribute name")
        table[key] = HostedSpec(key, factory, scope)
    return table


class Queue:
    """A server-hosted queue seen from a client: ``put``/``get`` any picklable value.

    >>> q = rpycsvc.Queue(conn, "tasks")      # doctest: +SKIP
    >>> q.put({"n": 3}); q.get(timeout=5)
    {'n': 3}

    ``conn`` is an :class:`rpycsvc.Client` (or a cluster's ``cluster[0]``). Items travel by
    value (pickle protocol 5); every client on every host that names the same queue on
    the same server shares it.
    """

    def __init__(self, conn: Any, name: str, maxsize: int = 0) -> None:
        raw = getattr(conn, "conn", conn)  # an rpycsvc.Client or a raw rpyc connection
        self.name = name
        self._remote = raw.root.queue(name, maxsize)

    def put(self, item: Any, timeout: float | None = None) -> None:
        """Append ``item``; with a bounded queue, wait up to ``timeout`` for room."""
        from rpycsvc.protocol.serialization import dumps

        try:
            self._remote.put_frames(dumps(item, "queue item"), timeout)
        except TimeoutError:
            raise RpycsvcTimeoutError(f"queue {self.name!r} stayed full for {timeout} s") from None

    def get(self, timeout: float | None = None) -> Any:
        """Remove and return the next item; ``TimeoutError`` if none came within ``timeout``."""
        from rpycsvc.protocol.serialization import loads

        try:
            pickled, value = self._remote.get_entry(timeout)
        except TimeoutError:  # RPyC rebuilt the server's TimeoutError; give a clean one
            raise RpycsvcTimeoutError(
                f"queue {self.name!r} stayed empty for {timeout} s") from None
        return loads(value, "queue item") if pickled else value

    def qsize(self) -> int:
        return int(self._remote.qsize())

    def empty(self) -> bool:
        return bool(self._remote.empty())
