"""Module forwarding, the client's end: answers a server's request for one of the client's
own modules (see :mod:`rpycsvc.protocol.forwarding` for the whole design).

Client side, :class:`ModuleProvider` answers one question, "the module called ``name``,
please", and never anything else: the server can't name a file, only a module, which the
client looks up with the import system's own path finder (nothing is imported on the client)
in the client's *project* directories only — its ``sys.path`` entries outside the standard
library and site-packages/dist-packages. Installed third-party packages are not sent unless
the user lists them (``forward_packages=["attrs"]``): a server missing one gets an error
naming the distribution and the client's version, since a package is better installed than
shipped file by file (it may carry data, entry points, C extensions). C extensions are never
sent (built for one platform and Python): the error names the module.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import logging
import os
import re
import site
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Callable

from rpycsvc.protocol.forwarding import RESOURCE, Reply

#: Largest module file a client sends.
MAX_MODULE_BYTES = 32 << 20

_log = logging.getLogger("rpycsvc.forwarding")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


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
