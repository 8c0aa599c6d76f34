"""Environment checks: what a task needs of its server's Python, checked on the client.

Both sides say their Python and cloudpickle versions in their hello
(:mod:`rpycsvc.protocol.handshake`).
Most of what travels does not care: classic access is RPyC's, import-path tasks and endpoints
are names, and data and functions of installed modules pickle by reference with the standard
protocol 5, which every supported Python reads. Code pickled *by value* is different:
cloudpickle rebuilds a function or class from its code object, whose constructor changes with
each Python minor version, through private helpers of its own that change between its major
versions. A lambda pickled on 3.11 does not load on 3.9. So a task holding such code, sent to
a server of another Python minor or cloudpickle major version, fails here with
:class:`~rpycsvc.errors.EnvironmentMismatchError` before it is sent, instead of failing (or
worse, misbehaving) there. A ``Cluster`` whose servers differ gives such a task only to
servers that can rebuild it (:func:`misfits`); it fails only when none can.

Installed packages a task's pickle refers to by reference (``numpy`` for an array, ``mylib``
for ``mylib.f``) must exist on the server; when their versions differ, the pickle usually
still loads, but may not mean the same thing. That difference is logged as a warning, once
per package and server: a background thread asks the server (through classic access) for
the version of each installed distribution it has not asked about yet. Per task, the send
path only picks names out of the pickles (a cached lookup for a function already seen, a
regular-expression scan of the arguments' pickle when it refers to any global at all).
Reading pickles is :mod:`rpycsvc.client.pickles`'s; what is installed here,
:mod:`rpycsvc.client.distributions`'s.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, Callable

from rpycsvc.client.distributions import EXEMPT, local_distribution
from rpycsvc.client.pickles import candidate_modules, holds_code_by_value
from rpycsvc.errors import EnvironmentMismatchError

log = logging.getLogger("rpycsvc.environment")


def minor(version: str | None) -> str:
    """``"3.11.7"`` → ``"3.11"`` (``"?"`` if unknown)."""
    return ".".join(str(version or "?").split(".")[:2])


def major(version: str | None) -> str:
    """``"3.1.3"`` → ``"3"`` (``"?"`` if unknown)."""
    return str(version or "?").split(".")[0]


def by_value_conflict(client: Mapping[str, Any], server: Mapping[str, Any]) -> str | None:
    """What differs between two hellos that code pickled by value can't cross, or None."""
    parts = []
    if minor(client.get("python")) != minor(server.get("python")):
        parts.append(f"Python {minor(server.get('python'))} (this client runs "
                     f"{minor(client.get('python'))})")
    if major(client.get("cloudpickle")) != major(server.get("cloudpickle")):
        parts.append(f"cloudpickle {server.get('cloudpickle')} (this client runs "
                     f"{client.get('cloudpickle')})")
    return " and ".join(parts) or None


def mismatch_message(address: str, client: Mapping[str, Any], server: Mapping[str, Any],
                     what: str) -> str:
    """The text of :class:`EnvironmentMismatchError` for a task holding ``what``."""
    here = f"python{minor(client.get('python'))}"
    return (
        f"can't send {what} to {address}: it is pickled by value (its code travels), and "
        f"{address} runs {by_value_conflict(client, server)}; code sent by value needs the same "
        f"Python minor version and cloudpickle major version on both sides (client: Python "
        f"{client.get('python')}, cloudpickle {client.get('cloudpickle')}; server: Python "
        f"{server.get('python')}, cloudpickle {server.get('cloudpickle')}). Nothing was sent. "
        f"Fix: run the server on this client's versions (rpycsvc.deploy(..., "
        f"python='/path/to/{here}') with cloudpickle {major(client.get('cloudpickle'))}.x), "
        f"or send the task by import path, \"module:function\", from a module installed on "
        f"the server."
    )


# -- one server's environment -----------------------------------------------------------------
class ServerEnvironment:
    """A connection's view of its server's environment: the versions from its hello, the
    by-value check, and which packages' versions it asked the server about already.

    ``ask_version(distribution)`` returns the server's version of an installed distribution
    (None if it has none); it runs in the background checker thread, never on the send
    path. Without it (a service-only server has no classic access) packages aren't checked.
    """

    def __init__(self, address: str, client: Mapping[str, Any], server: Mapping[str, Any],
                 ask_version: Callable[[str], str | None] | None = None) -> None:
        self.address = address
        self.client = {k: str(client.get(k)) for k in ("python", "cloudpickle")}
        self.server = {k: str(server.get(k)) for k in ("python", "cloudpickle")}
        known = all(server.get(k) for k in ("python", "cloudpickle"))
        #: why code sent by value can't run there (None: it can)
        self.conflict = by_value_conflict(client, server) if known else None
        #: another cloudpickle major: none of its private helpers may be relied on
        self._other_cloudpickle = known and \
            major(client.get("cloudpickle")) != major(server.get("cloudpickle"))
        self._ask = ask_version
        #: top-level names seen in tasks' pickles (checked, or not worth checking)
        self._seen: set[str] = set(EXEMPT)
        #: the last task function's pickle and the names in it (one tuple: thread-safe)
        self._last: tuple[Any, set[str]] = (None, set())
        if self.conflict:
            log.warning("%s runs Python %s with cloudpickle %s, this client Python %s with "
                        "cloudpickle %s: classic access, import-path tasks and endpoints work, "
                        "tasks holding code sent by value (lambdas, functions and classes of "
                        "__main__) can't run there (a Cluster gives them to its servers that "
                        "can; else they fail with EnvironmentMismatchError)", address,
                        self.server["python"], self.server["cloudpickle"],
                        self.client["python"], self.client["cloudpickle"])

    def check_task(self, kind: str, spec: Any, frames: tuple[Any, ...]) -> None:
        """Called for every task before it is sent: raise
        :class:`EnvironmentMismatchError` if it holds code pickled by value the server
        can't rebuild; hand the packages it refers to, not asked about yet, to the checker.
        """
        if kind == "pickled":
            fn_blob, head = frames[0], (frames[1] if len(frames) > 1 else b"")
        else:
            fn_blob, head = None, (frames[0] if frames else b"")
        if self.conflict is not None:
            self._refuse_code_by_value(fn_blob, head)
        if self._ask is None:
            return
        # (the common case, a function sent before and nothing new: no allocation, no lock)
        seen = self._seen
        if fn_blob is not None:
            last = self._last
            if last[0] is not fn_blob:
                last = self._last = (fn_blob, _function_modules(fn_blob))
            if not last[1] <= seen:
                self._note(last[1] - seen)
        elif kind == "path" and isinstance(spec, str):
            top = spec.partition(":")[0].partition(".")[0]
            if top not in seen:
                self._note({top})
        if head and 0x93 in head:  # STACK_GLOBAL's byte (an int: bytes' fast memchr)
            names = candidate_modules(head)
            if not names <= seen:
                self._note(names - seen)

    def _note(self, new: set[str]) -> None:
        self._seen |= new
        _CHECKER.put(self, new)

    def _refuse_code_by_value(self, fn_blob: Any, head: Any) -> None:
        what = None
        if fn_blob is not None and _function_by_value(bytes(fn_blob)):
            what = "a task function"
        elif head and holds_code_by_value(bytes(head)):
            what = "arguments holding a function or class"
        elif head and self._other_cloudpickle and holds_code_by_value(bytes(head), True):
            what = "arguments pickled with cloudpickle's own helpers"
        if what is not None:
            raise EnvironmentMismatchError(
                mismatch_message(self.address, self.client, self.server, what),
                address=self.address, client=self.client, server=self.server)

    def compare(self, names: Iterable[str]) -> None:
        """In the checker thread: warn about each installed distribution among ``names``
        whose version on the server differs from ours (once per package and server)."""
        assert self._ask is not None
        for module in sorted(names):
            try:
                local = local_distribution(module)
            except Exception:
                log.debug("can't tell which distribution provides %s", module, exc_info=True)
                continue
            if local is None:
                continue
            dist, here = local
            key = (self.address, dist)
            if key in _WARNED:
                continue
            try:
                there = self._ask(dist)
            except Exception as exc:  # the connection went away, or classic access failed
                log.debug("can't ask %s for the version of %s: %s", self.address, dist, exc)
                self._seen.discard(module)  # ask again with a later task
                continue
            _WARNED.add(key)
            if there is not None and there != here:
                log.warning(
                    "%s: this client has %s %s, the server %s %s; a task's pickle refers to "
                    "it, and objects of one version may load differently (or not at all) "
                    "under another: pip install %s==%s on the server (or rpycsvc.deploy), "
                    "or %s==%s here", self.address, dist, here, dist, there, dist, here,
                    dist, there)


#: (address, distribution) pairs already asked about in this process (warned if they differ)
_WARNED: set[tuple[str, str]] = set()

#: task function pickle → (holds code by value, candidate modules); small pickles only
_FUNCTIONS: OrderedDict[bytes, tuple[bool | None, set[str]]] = OrderedDict()
_FUNCTIONS_LOCK = threading.Lock()
_FUNCTIONS_MAX = 256
_FUNCTION_MAX_BYTES = 64 * 1024


def _function_entry(blob: Any) -> tuple[bool | None, set[str]]:
    # A by-reference function's pickle is one cached bytes object (serialization caches
    # it per function), whose hash Python keeps: the lookup is a dict hit.
    raw = blob if isinstance(blob, bytes) else bytes(blob)
    with _FUNCTIONS_LOCK:
        entry = _FUNCTIONS.get(raw)
        if entry is not None:
            _FUNCTIONS.move_to_end(raw)
            return entry
    entry = (None, candidate_modules(raw))
    if len(raw) <= _FUNCTION_MAX_BYTES:
        with _FUNCTIONS_LOCK:
            _FUNCTIONS[raw] = entry
            if len(_FUNCTIONS) > _FUNCTIONS_MAX:
                _FUNCTIONS.popitem(last=False)
    return entry


def _function_modules(blob: Any) -> set[str]:
    return _function_entry(blob)[1]


def _function_by_value(raw: bytes) -> bool:
    by_value, names = _function_entry(raw)
    if by_value is None:
        by_value = holds_code_by_value(raw)
        with _FUNCTIONS_LOCK:
            if raw in _FUNCTIONS:
                _FUNCTIONS[raw] = (by_value, names)
    return by_value


def task_holds_code_by_value(kind: str, frames: tuple[Any, ...]) -> bool:
    """Whether a task (as :func:`~rpycsvc.client.calls.frames_of_call` packs it) holds code
    pickled
    by value, in its function or its arguments. Cached per function; an arguments' pickle
    is walked only if it names cloudpickle."""
    if kind == "pickled":
        if _function_by_value(bytes(frames[0])):
            return True
        head = frames[1] if len(frames) > 1 else b""
    else:
        head = frames[0] if frames else b""
    return bool(head) and holds_code_by_value(bytes(head))


def misfits(kind: str, frames: tuple[Any, ...], servers: Iterable[Any]) -> AbstractSet[Any]:
    """The servers of a cluster that a task must not be given to: those that can't rebuild
    its code sent by value, when the cluster has others that can. (When none can, the
    task goes wherever and fails there with :class:`EnvironmentMismatchError`, which names
    the fix; when all can, nothing is excluded.) ``servers`` have ``usable`` and
    ``client``. Costs an attribute check per server unless the cluster is mixed."""
    bad: set[Any] | None = None
    fits = False
    for srv in servers:
        client = srv.client
        if client is None or not srv.usable:
            continue
        if client.environment.conflict is None:
            fits = True
        else:
            bad = bad or set()
            bad.add(srv)
    if not bad or not fits or not task_holds_code_by_value(kind, frames):
        return _NOBODY
    return bad


_NOBODY: frozenset[Any] = frozenset()


class _Checker:
    """One daemon thread for the whole process that asks servers for package versions,
    so that a task's send never waits for a round trip."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[weakref.ref[ServerEnvironment], set[str]]] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: tests wait on this: set whenever the queue has been worked off
        self.idle = threading.Event()
        self.idle.set()

    def put(self, env: ServerEnvironment, names: set[str]) -> None:
        self.idle.clear()
        self._queue.put((weakref.ref(env), names))
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="rpycsvc-environment-check")
                self._thread.start()

    def _run(self) -> None:
        while True:
            ref, names = self._queue.get()
            env = ref()
            if env is not None:
                # Each check in a thread of its own, waited for at most ASK_TIMEOUT: a server
                # that doesn't answer (frozen, until its client declares it lost; or one
                # whose client has no lost_after) must not hold up every other server's.
                done = threading.Event()
                threading.Thread(target=_compare, args=(env, names, done), daemon=True,
                                 name="rpycsvc-environment-ask").start()
                if not done.wait(ASK_TIMEOUT):
                    log.debug("%s did not answer a package version check within %g s; "
                              "going on without it", env.address, ASK_TIMEOUT)
            del env
            if self._queue.empty():
                self.idle.set()


#: How long the checker waits for one server's answer before it goes on with the others.
ASK_TIMEOUT = 10.0


def _compare(env: ServerEnvironment, names: set[str], done: threading.Event) -> None:
    try:
        env.compare(names)
    except Exception:  # a warning is all this is for: never break anything
        log.debug("package version check failed", exc_info=True)
    finally:
        done.set()


_CHECKER = _Checker()


def wait_checked(timeout: float) -> bool:
    """Wait until the package version checks asked for so far are done (for tests and
    short scripts); True if they are."""
    return _CHECKER.idle.wait(timeout)


def versions_of(conn: Any) -> dict[str, Any]:
    """The server's ``python`` and ``cloudpickle`` versions from its ``stats()``, for a
    hello that lacks them (a deployed server's comes through RPyC, not the handshake)."""
    from rpycsvc.protocol.serialization import loads

    try:
        stats = loads(conn.root.stats_frames(), "stats")
    except (EOFError, OSError, TimeoutError):
        raise  # the connection itself failed: connecting fails
    except Exception as exc:  # no such call, or stats it can't send: the checks stay off
        log.debug("can't read the server's versions from its stats: %s", exc)
        return {}
    return {k: stats[f"{k}_version"] for k in ("python", "cloudpickle")
            if stats.get(f"{k}_version")}


def for_client(client: Any) -> ServerEnvironment:
    """The :class:`ServerEnvironment` of a new :class:`~rpycsvc.client.connection.Client` (from its
    hello: the handshake's, or a deployed server's RPyC hello, then from ``stats()``)."""
    from rpycsvc.protocol.handshake import versions

    hello = client.server_info
    server = {k: hello.get(k) for k in ("python", "cloudpickle")}
    ask: Callable[[str], str | None] | None = None
    if hello.get("classic", True):
        conn = client.conn

        def ask(dist: str) -> str | None:
            metadata = conn.modules["importlib.metadata"]
            try:
                return str(metadata.version(dist))
            except Exception as exc:  # RPyC rebuilds the server's exception here
                if "PackageNotFoundError" in type(exc).__name__:
                    return None  # not installed there: the task's import will say so
                raise

    return ServerEnvironment(client.address, versions(), server, ask)
