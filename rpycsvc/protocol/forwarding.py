"""Module forwarding: a worker imports the client's own modules it lacks, from the client.

A task's function, arguments and results refer to functions and classes of modules *by
name* (pickle's rule; cloudpickle sends only ``__main__`` and lambdas by value). When such a
module is part of the user's project and not installed on the server, unpickling the task
used to fail with ``ModuleNotFoundError``. As in Mitogen, the worker now asks the client for
it, during the import, and imports the answer in memory.

Client side, :class:`ModuleProvider` answers one question, "the module called ``name``,
please", and never anything else: the server can't name a file, only a module, which the
client looks up with the import system's own path finder (nothing is imported on the client)
in the client's *project* directories only — its ``sys.path`` entries outside the standard
library and site-packages/dist-packages. Installed third-party packages are not sent unless
the user lists them (``forward_packages=["attrs"]``): a server missing one gets an error
naming the distribution and the client's version, since a package is better installed than
shipped file by file (it may carry data, entry points, C extensions). C extensions are never
sent (built for one platform and Python): the error names the module.

Worker side, :class:`ForwardedModules` is a meta-path finder placed *last* on
``sys.meta_path``, so whatever the server can import itself wins; it asks only while a task
runs, and only through the task's own client (see ``fetch`` in :mod:`rpycsvc.server.worker`): the
server never asks outside an import. Requests go by one function per path — over the
worker's channel to the server, which asks the client with a task message on the
client's connection (:mod:`rpycsvc.server.workerprocess`,
:mod:`rpycsvc.server.taskserver`) — and each waits at most
:data:`FETCH_TIMEOUT` seconds: a client that does not answer makes the import fail with
an ``ImportError`` that says so.

Forwarded modules are keyed by content. The client keeps the digest (a hash of the bytes)
of every module it has sent, and a *version* number that goes up whenever one of those
changes on disk (looked for before each task: a ``stat`` per module, and a hash when the
file's time or size moved); every task carries the client's token and that version: a few
bytes, however large the project. Before the task runs, a worker that holds forwarded
modules of another client, or of an older version, drops every forwarded module (and its
cache of unpickled functions): the task's imports then fetch the current files. So an edited
module is used from the next task on, and a worker never runs one client's task with
another client's code. Modules are dropped rather than the worker restarted, so that two
clients taking turns on a server don't pay a worker start (a few hundred ms) per turn; what
a dropped module did to the rest of the process (registered itself with an installed
library, say) stays until the worker is replaced.

Thread-mode tasks share one process and so one ``sys.modules``: tasks of one client share
its forwarded modules as process tasks do; when a task of another client (or after an edit)
starts, the forwarded modules are dropped while other thread tasks may still run: those
keep the module objects they already hold, but an import they make afterwards gets the
version of whoever imported it first. Use process mode when clients with different versions
of a module share a server.
"""

from __future__ import annotations

import _imp
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import logging
import marshal
import os
import re
import site
import sys
import sysconfig
import threading
import time
import types
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any, Callable


def _fetch_timeout() -> float:
    try:
        value = float(os.environ.get("RPYCSVC_FORWARD_TIMEOUT", "30"))
    except ValueError:
        return 30.0
    return value if value > 0 else 30.0


#: Seconds a worker waits for the client to send a module before the import fails.
FETCH_TIMEOUT = _fetch_timeout()
#: Largest module file a client sends.
MAX_MODULE_BYTES = 32 << 20

#: What a module request is answered with (plain tuples: RPyC's brine and pickle carry them):
#: ``("module", name, is_package, filename, "source"|"pyc"|"namespace", data, digest)``,
#: ``("none", name)`` (not the client's to give: the import goes on as if not found) or
#: ``("error", name, message)`` (the import fails with that message). A request for a data
#: file of a forwarded package (``importlib.resources``) is named ``resource:PKG:PATH`` and
#: answered ``("data", request, bytes)``, ``("dir", request, ((entry, is_dir), ...))``,
#: ``("none", request)`` or ``("error", request, message)``.
Reply = tuple[Any, ...]
RESOURCE = "resource:"

_log = logging.getLogger("rpycsvc.forwarding")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


# -- client side -----------------------------------------------------------------------------
def _stdlib_dirs() -> list[str]:
    """The standard library's directories."""
    paths = sysconfig.get_paths()
    return [os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if k in paths]


def _excluded_dirs() -> list[str]:
    """Directories whose modules are not the user's project: the standard library and the
    installation's site-packages (any ``site-packages``/``dist-packages`` is excluded too)."""
    dirs: set[str] = set(_stdlib_dirs())
    for key in ("purelib", "platlib"):
        try:
            dirs.add(sysconfig.get_paths()[key])
        except KeyError:
            pass
    try:
        dirs.update(site.getsitepackages())
    except AttributeError:  # (virtualenv's old site.py)
        pass
    user = getattr(site, "getusersitepackages", lambda: "")()
    if user:
        dirs.add(user)
    return [os.path.realpath(d) for d in dirs if d]


def _under(path: str, dirs: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip(os.sep) + os.sep) for d in dirs)


def _is_installed_dir(path: str) -> bool:
    parts = path.split(os.sep)
    return "site-packages" in parts or "dist-packages" in parts


def project_paths() -> list[str]:
    """The client's ``sys.path`` entries that hold its own project: existing directories
    outside the standard library and site-packages (``""`` is the working directory)."""
    excluded = _excluded_dirs()
    out: list[str] = []
    for entry in sys.path:
        if not isinstance(entry, str):
            continue
        path = os.path.realpath(entry or os.getcwd())
        if not os.path.isdir(path) or _is_installed_dir(path) or _under(path, excluded):
            continue
        if path not in out:
            out.append(path)
    return out


def _locate(name: str, paths: list[str]) -> importlib.machinery.ModuleSpec | None:
    """Find module ``name`` under ``paths`` as the import system would, without importing
    anything (a package's submodules are looked up in its directories)."""
    parts = name.split(".")
    search = paths
    spec = None
    for i in range(len(parts)):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), search)
        if spec is None:
            return None
        if i < len(parts) - 1:
            search = list(spec.submodule_search_locations or [])
            if not search:
                return None
    return spec


def _distribution(top: str) -> tuple[str, str] | None:
    """``(distribution name, version)`` of the installed distribution providing the
    top-level module ``top``, if any."""
    from importlib import metadata

    try:
        names = metadata.packages_distributions().get(top)  # type: ignore[attr-defined]
        if names:
            return names[0], metadata.version(names[0])
    except AttributeError:  # Python 3.9: no packages_distributions()
        for dist in metadata.distributions():
            tops = (dist.read_text("top_level.txt") or "").split()
            if not tops:
                tops = [f.parts[0].split(".")[0] for f in (dist.files or ()) if f.parts]
            if top in tops:
                return dist.metadata["Name"], dist.version
    except Exception:
        pass
    return None


#: A file modified less than this many seconds ago is hashed again even if its time and
#: size look unchanged: file times tick coarsely (milliseconds), so an edit of the same
#: size right after the last one can keep both (git's "racy" entries).
_RACY = 2.0


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class ModuleProvider:
    """The client's side: answers a server's request for one module (see the module
    docstring for what is offered). One per set of ``forward_packages`` per process
    (:func:`provider`): its ``token`` names this client to workers, and it remembers what
    it sent, so each task can tell workers whether any of it changed since."""

    def __init__(self, packages: Sequence[str] = ()) -> None:
        self.token = uuid.uuid4().hex
        self.packages = frozenset(_norm(p) for p in packages)
        self._lock = threading.Lock()
        #: name -> (file, (mtime_ns, size), digest) of what was sent
        self._sent: dict[str, tuple[str, tuple[int, int], str]] = {}
        self._version = 0  # see option()

    def answer(self, name: Any) -> Reply:
        """The reply to a request for module ``name``; never raises."""
        if isinstance(name, str) and name.startswith(RESOURCE) and len(name) < 4096:
            try:
                return self._resource(name)
            except Exception as exc:
                return ("error", name, f"the client could not read {name!r}: "
                        f"{type(exc).__name__}: {exc}")
        if not isinstance(name, str) or not _NAME.match(name) or len(name) > 500:
            return ("error", str(name)[:100], "not a module name")
        try:
            return self._answer(name)
        except Exception as exc:  # a reply, not a dead connection
            return ("error", name, f"the client could not read module {name!r}: "
                    f"{type(exc).__name__}: {exc}")

    def _answer(self, name: str) -> Reply:
        spec = _locate(name, project_paths())
        if spec is not None:
            return self._send(name, spec)
        spec = _locate(name, [p for p in sys.path if isinstance(p, str) and p]) \
            if not name.startswith("rpycsvc") else None
        if spec is None:
            return ("none", name)
        origin = os.path.realpath(spec.origin) if spec.origin and \
            spec.has_location else ""
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if origin and _under(origin, _stdlib_dirs()) and not _is_installed_dir(origin):
            return ("error", name, f"{name!r} is in the client's standard library (Python "
                    f"{here}) but the server can't import it: the server runs another Python "
                    "version; deploy with python=... of the client's version")
        top = name.split(".")[0]
        dist = _distribution(top)
        if top in self.packages or (dist is not None and _norm(dist[0]) in self.packages):
            return self._send(name, spec)
        if dist is None:
            where = f" ({origin})" if origin else ""
            return ("error", name, f"module {name!r} is installed on the client{where} but "
                    f"the server can't import it: install it on the server, or pass "
                    f"forward_packages=[{top!r}] to send it (pure-Python code only)")
        pkg, version = dist
        return ("error", name, f"module {name!r} comes from {pkg} {version}, installed on "
                f"the client but not on the server: run `pip install {pkg}=={version}` "
                f"there, or pass forward_packages=[{pkg!r}] to connect()/Cluster to send it "
                "(pure-Python distributions only)")

    def _send(self, name: str, spec: importlib.machinery.ModuleSpec) -> Reply:
        loader = spec.loader
        is_pkg = spec.submodule_search_locations is not None
        if loader is None or spec.origin in (None, "namespace"):  # a namespace package
            return ("module", name, True, "", "namespace", b"", "namespace")
        path = str(spec.origin)
        if isinstance(loader, importlib.machinery.ExtensionFileLoader):
            return ("error", name, f"module {name!r} is a C extension ({path}): compiled "
                    "code is not forwarded (it is built for one platform and Python); "
                    "install its package on the server")
        if isinstance(loader, importlib.machinery.SourceFileLoader):
            kind = "source"
        elif isinstance(loader, importlib.machinery.SourcelessFileLoader):
            kind = "pyc"
        else:
            return ("error", name, f"module {name!r} is loaded by {type(loader).__name__} "
                    f"({path}), which can't be forwarded; install it on the server")
        st = os.stat(path)
        if st.st_size > MAX_MODULE_BYTES:
            return ("error", name, f"module {name!r} ({path}) is {st.st_size} bytes: over "
                    f"the {MAX_MODULE_BYTES} bytes a module may have to be forwarded")
        with open(path, "rb") as f:
            data = f.read()
        digest = _digest(data)
        with self._lock:
            before = self._sent.get(name)
            self._sent[name] = (path, (st.st_mtime_ns, st.st_size), digest)
            if before is not None and before[2] != digest:
                # A worker may hold the old content under the current version: a new
                # version makes it drop that before our next task.
                self._version += 1
        return ("module", name, is_pkg, path, kind, data, digest)

    def _resource(self, request: str) -> Reply:
        """A data file (or directory listing) inside a package this client forwarded:
        nothing outside that package's directory, symlinks included."""
        _, pkg, rel = request.split(":", 2)
        with self._lock:
            sent = self._sent.get(pkg)
        if sent is None or os.path.basename(sent[0]) != "__init__.py":
            return ("error", request, f"{pkg!r} is not a package this client forwarded")
        base = os.path.realpath(os.path.dirname(sent[0]))
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if any(p == ".." or "\0" in p or os.sep in p for p in parts):
            return ("error", request, f"bad resource path {rel!r}")
        if any(p.startswith(".") for p in parts):  # .env, .git/...: never a package's data
            return ("error", request, f"resource {rel!r} of {pkg!r} is a hidden file "
                    "(names starting with '.' are not sent)")
        path = os.path.realpath(os.path.join(base, *parts))
        if not _under(path, [base]):
            return ("error", request, f"resource {rel!r} is outside package {pkg!r}")
        if os.path.isdir(path):
            with os.scandir(path) as entries:
                return ("dir", request, tuple(sorted(
                    (e.name, e.is_dir()) for e in entries
                    if e.name != "__pycache__" and not e.name.startswith("."))))
        if not os.path.isfile(path):
            return ("none", request)
        if os.path.getsize(path) > MAX_MODULE_BYTES:
            return ("error", request, f"resource {rel!r} of {pkg!r} is over the "
                    f"{MAX_MODULE_BYTES} bytes a forwarded file may have")
        with open(path, "rb") as f:
            return ("data", request, f.read())

    def option(self) -> tuple[str, int]:
        """What each task carries: ``(token, version)``; the version goes up when a module
        sent before has other content now (a file merely touched does not count)."""
        with self._lock:
            sent = list(self._sent.items())
        changed = False
        wall = time.time()
        for name, (path, sig, digest) in sent:
            try:
                st = os.stat(path)
                now = (st.st_mtime_ns, st.st_size)
                recent = wall - st.st_mtime < _RACY
            except OSError:
                now, recent = (-1, -1), False  # gone: counts as changed once
            if now == sig and not recent:
                continue
            try:
                with open(path, "rb") as f:
                    fresh = _digest(f.read())
            except OSError:
                fresh = "gone"
            with self._lock:
                self._sent[name] = (path, now, fresh)
            changed = changed or fresh != digest
        with self._lock:
            if changed:
                self._version += 1
            return (self.token, self._version)


class ConnectionModules:
    """What a client hands one server connection (its ``answer`` goes in ``hello``): the
    process's :class:`ModuleProvider`, answering only while ``busy()`` says a task of ours
    runs on that connection. A server holds the reference for as long as the connection
    lasts and may call it whenever it likes; outside our tasks' imports it gets a refusal
    (and we log it). ``busy`` is set once the connection's Client exists."""

    def __init__(self, provider: ModuleProvider, address: str) -> None:
        self.provider = provider
        self.address = address
        self.busy: Callable[[], bool] = lambda: False

    def answer(self, name: Any) -> Reply:
        """The provider's reply to ``name`` while a task of ours runs, else a refusal."""
        if not self.busy():
            shown = str(name)[:200]
            _log.warning("refused %s's request for %r: no task of this client is running "
                         "on that connection (module forwarding answers only its tasks' "
                         "imports)", self.address, shown)
            return ("error", shown, "refused: no task of this client is running on this "
                    "connection")
        return self.provider.answer(name)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_PROVIDERS: dict[frozenset[str], ModuleProvider] = {}
_PROVIDERS_LOCK = threading.Lock()


def provider(packages: Sequence[str] = ()) -> ModuleProvider:
    """This process's provider for ``packages`` (one token per process and package list,
    so every connection of one program counts as one client to a worker)."""
    if isinstance(packages, str):
        packages = [packages]
    key = frozenset(_norm(p) for p in packages)
    with _PROVIDERS_LOCK:
        found = _PROVIDERS.get(key)
        if found is None:
            found = _PROVIDERS[key] = ModuleProvider(list(packages))
        return found


# -- worker side ---------------------------------------------------------------------------------
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
