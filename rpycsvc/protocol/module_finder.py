"""Module forwarding, the worker's end: a meta-path finder that imports a module the server
lacks from the running task's client (see :mod:`rpycsvc.protocol.forwarding` for the whole
design).

Worker side, :class:`ForwardedModules` is a meta-path finder placed *last* on
``sys.meta_path``, so whatever the server can import itself wins; it asks only while a task
runs, and only through the task's own client (see :mod:`rpycsvc.server.workerimports`): the
server never asks outside an import. Requests go by one function per path — over the
worker's channel to the server, which asks the client with a task message on the
client's connection (:mod:`rpycsvc.server.workerprocess`,
:mod:`rpycsvc.server.taskserver`) — and each waits at most :data:`FETCH_TIMEOUT`
seconds: a client that does not answer makes the import fail with
an ``ImportError`` that says so.

Thread-mode tasks share one process and so one ``sys.modules``: tasks of one client share
its forwarded modules as process tasks do; when a task of another client (or after an edit)
starts, the forwarded modules are dropped while other thread tasks may still run: those
keep the module objects they already hold, but an import they make afterwards gets the
version of whoever imported it first. Use process mode when clients with different versions
of a module share a server.
"""

from __future__ import annotations

import _imp
import importlib.abc
import importlib.machinery
import importlib.util
import io
import marshal
import os
import sys
import threading
import types
from collections.abc import Iterator
from typing import IO, Any, Callable

from rpycsvc.protocol.forwarding import RESOURCE, Reply


def _fetch_timeout() -> float:
    try:
        value = float(os.environ.get("RPYCSVC_FORWARD_TIMEOUT", "30"))
    except ValueError:
        return 30.0
    return value if value > 0 else 30.0


#: Seconds a worker waits for the client to send a module before the import fails.
FETCH_TIMEOUT = _fetch_timeout()

Fetch = Callable[[str], Reply]


class _ForwardedLoader(importlib.abc.Loader):
    """Executes a module the client sent; serves its source to ``linecache`` so tracebacks
    through forwarded code show their lines."""

    def __init__(self, name: str, filename: str, kind: str, data: bytes,
                 finder: ForwardedModules) -> None:
        self.name = name
        self.filename = filename
        self.kind = kind
        self.data = data
        self.finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        if self.kind == "namespace":
            return
        if self.kind == "pyc":
            if self.data[:4] != importlib.util.MAGIC_NUMBER:
                raise ImportError(
                    f"module {self.name!r} was forwarded as bytecode of another Python "
                    f"version than the server's ({sys.version.split()[0]}); send its source",
                    name=self.name)
            code = marshal.loads(self.data[16:])
        else:
            code = compile(self.data, self.filename, "exec", dont_inherit=True)
        exec(code, module.__dict__)

    def get_source(self, fullname: str) -> str | None:
        if self.kind != "source":
            return None
        return importlib.util.decode_source(self.data)

    def is_package(self, fullname: str) -> bool:
        return self.filename.endswith("__init__.py")

    def get_resource_reader(self, fullname: str) -> _Resources | None:
        """``importlib.resources`` for a forwarded package: its data files, read from the
        client when a task reads them (always the file's content now; nothing cached)."""
        return _Resources(self.finder, fullname) if self.is_package(fullname) else None


class _Resources:
    """A forwarded package's data files (``importlib.resources``): a ResourceReader for
    Python 3.9's API, with ``files()`` for the newer one. Each read asks the running
    task's client; outside a task there is nobody to ask (FileNotFoundError)."""

    def __init__(self, finder: ForwardedModules, package: str) -> None:
        self.finder = finder
        self.package = package

    def ask(self, rel: str) -> Reply:
        fetch = self.finder.current()
        request = f"{RESOURCE}{self.package}:{rel}"
        if fetch is None:
            raise FileNotFoundError(f"{rel!r} of forwarded package {self.package!r}: its "
                                    "files are read from the client only while its task runs")
        reply = fetch(request)
        status = reply[0] if isinstance(reply, tuple) and reply else "error"
        if status == "none":
            raise FileNotFoundError(f"no resource {rel!r} in package {self.package!r} on "
                                    "the client")
        if status not in ("data", "dir") or len(reply) != 3:
            raise OSError(f"{reply[2] if status == 'error' and len(reply) > 2 else reply!r}"
                          " (module forwarding)")
        return reply

    # -- importlib.abc.ResourceReader (Python 3.9's importlib.resources functions)
    def open_resource(self, resource: str) -> io.BytesIO:
        reply = self.ask(resource)
        if reply[0] != "data":
            raise IsADirectoryError(f"{resource!r} of {self.package!r} is a directory")
        return io.BytesIO(reply[2])

    def resource_path(self, resource: str) -> str:
        raise FileNotFoundError(f"{resource!r} of forwarded package {self.package!r} is not "
                                "a file on this server (read it, or use as_file())")

    def is_resource(self, name: str) -> bool:
        try:
            return self.ask(name)[0] == "data"
        except FileNotFoundError:
            return False

    def contents(self) -> list[str]:
        return [entry for entry, _ in self.ask("")[2]]

    def files(self) -> _Traversable:
        return _Traversable(self, "")


class _Traversable:
    """A path in a forwarded package (``importlib.resources.files(pkg) / "data.txt"``)."""

    def __init__(self, resources: _Resources, rel: str) -> None:
        self._resources = resources
        self._rel = rel

    @property
    def name(self) -> str:
        return self._rel.rsplit("/", 1)[-1] if self._rel else self._resources.package

    def joinpath(self, *parts: str) -> _Traversable:
        rel = "/".join(p for p in (self._rel, *(str(x).strip("/") for x in parts)) if p)
        return _Traversable(self._resources, rel)

    def __truediv__(self, child: str) -> _Traversable:
        return self.joinpath(child)

    def iterdir(self) -> Iterator[_Traversable]:
        for entry, _ in self._resources.ask(self._rel)[2]:
            yield self.joinpath(entry)

    def _kind(self) -> str:
        try:
            return str(self._resources.ask(self._rel)[0])
        except FileNotFoundError:
            return "none"

    def is_dir(self) -> bool:
        return self._kind() == "dir"

    def is_file(self) -> bool:
        return self._kind() == "data"

    def read_bytes(self) -> bytes:
        return self._resources.open_resource(self._rel).getvalue()

    def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
        return self.read_bytes().decode(encoding or "utf-8", errors or "strict")

    def open(self, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
        if mode not in ("r", "rb"):
            raise ValueError(f"forwarded package files are read-only; got mode {mode!r}")
        data = io.BytesIO(self.read_bytes())
        return data if mode == "rb" else io.TextIOWrapper(data, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<forwarded {self._resources.package}:{self._rel or '.'}>"


class ForwardedModules(importlib.abc.MetaPathFinder):
    """The worker's side: a meta-path finder (last on ``sys.meta_path``) that asks the
    running task's client for a module nothing else found, and the books of what was
    forwarded (see the module docstring). ``current`` gives the running task's fetch
    function, or None outside a task (or for a client that forwards nothing)."""

    def __init__(self, current: Callable[[], Fetch | None],
                 on_drop: Callable[[], None] = lambda: None) -> None:
        self.current = current
        self.on_drop = on_drop
        self.owner = ""  # token of the client whose modules are loaded
        self.version = -1  # ...and that client's version of them (see ModuleProvider.option)
        self.loaded: dict[str, str] = {}  # name -> digest
        self._lock = threading.Lock()
        self._busy = threading.local()
        #: module name -> why the client could not send it (see find_spec and explain)
        self.hints: dict[str, str] = {}

    def install(self) -> ForwardedModules:
        sys.meta_path.append(self)
        return self

    def begin(self, option: Any) -> None:
        """A task starts with ``option`` (its client's token and version, or None: a
        client that forwards nothing): drop every forwarded module unless they are that
        client's, of that version."""
        ok = isinstance(option, tuple) and len(option) == 2 and isinstance(option[1], int)
        token, version = (str(option[0]), option[1]) if ok else ("", -1)
        with self._lock:
            if self.loaded and (token, version) == (self.owner, self.version):
                return
            self.owner, self.version = token, version
            self.hints.clear()
            if not self.loaded:
                return
            for name in self.loaded:
                sys.modules.pop(name, None)
            self.loaded.clear()
        importlib.invalidate_caches()
        self.on_drop()

    def find_spec(self, fullname: str, path: Any = None,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if getattr(self._busy, "on", False):
            return None  # an import made while fetching (by the worker's own code)
        fetch = self.current()
        if fetch is None:
            return None
        self._busy.on = True
        # The import system calls finders holding its global lock: waiting for the client
        # with it would stall every other thread's imports (other clients' tasks in a
        # thread worker) for up to FETCH_TIMEOUT. Let go of it meanwhile: the module's own
        # lock, held by _find_and_load, keeps other imports of this name waiting.
        released = _release_import_lock()
        try:
            reply = fetch(fullname)
        finally:
            self._busy.on = False
            if released:
                _imp.acquire_lock()
        status = reply[0] if isinstance(reply, tuple) and reply else "error"
        if status == "none":
            return None
        if status != "module" or len(reply) != 7:
            message = str(reply[2]) if status == "error" and len(reply) > 2 else \
                f"unexpected reply {str(reply)[:80]}"
            # Not found, as for any finder (importlib.util.find_spec returns None, a
            # try/except ImportError fallback works); the reason is added to the
            # ModuleNotFoundError a task fails with (see explain).
            with self._lock:
                self.hints.pop(fullname, None)
                self.hints[fullname] = f"{message} (module forwarding)"
                while len(self.hints) > 256:
                    self.hints.pop(next(iter(self.hints)))
            return None
        _, _name, is_pkg, filename, kind, data, digest = reply
        loader = _ForwardedLoader(fullname, str(filename) or f"<forwarded {fullname}>",
                                  str(kind), bytes(data), self)
        spec = importlib.util.spec_from_loader(fullname, loader, origin=loader.filename,
                                               is_package=bool(is_pkg))
        if spec is None:
            return None
        spec.has_location = kind != "namespace"
        with self._lock:
            self.loaded[fullname] = str(digest)
        return spec


    def explain(self, exc: BaseException) -> BaseException:
        """``exc`` (a task's exception), with the client's reason added to the message of
        the ModuleNotFoundError in it (itself, or what it was raised from) for a module the
        client could not send."""
        seen = 0
        cur: BaseException | None = exc
        while cur is not None and seen < 5:
            if isinstance(cur, ModuleNotFoundError) and cur.name:
                with self._lock:
                    hint = self.hints.get(cur.name)
                if hint and cur.args and isinstance(cur.args[0], str) \
                        and hint not in cur.args[0]:
                    cur.msg = f"{cur.args[0]}: {hint}"
                    cur.args = (cur.msg, *cur.args[1:])
                    if cur is not exc and exc.args and isinstance(exc.args[0], str):
                        exc.args = (f"{exc.args[0]} ({hint})", *exc.args[1:])
                break
            cur = cur.__cause__ or cur.__context__
            seen += 1
        return exc


def _release_import_lock() -> bool:
    """Release the global import lock if this thread holds it (once: a level it holds
    more than once stays held); whether it did. ``_imp.lock_held()`` is true whichever
    thread holds it, and releasing another thread's hold raises RuntimeError."""
    if not _imp.lock_held():
        return False
    try:
        _imp.release_lock()
    except RuntimeError:  # another thread's (find_spec called outside an import)
        return False
    return True


def timed_out(name: str, timeout: float) -> Reply:
    """The reply standing in for one that did not come in time."""
    return ("error", name, f"the client did not send module {name!r} within {timeout:g} s "
            "(it is busy, frozen or gone): set RPYCSVC_FORWARD_TIMEOUT (seconds) higher in "
            "the server's environment, install the module on the server, or connect with "
            "forward_modules=False")
