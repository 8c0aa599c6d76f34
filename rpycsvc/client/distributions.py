"""The distributions installed on this side: which one provides an imported module.

Read from the installed distributions' metadata (``importlib.metadata``, imported only when
first needed: it costs ~100 ms), once per ``sys.path``; the environment checks
(:mod:`rpycsvc.client.environment`) compare these versions with a server's.
"""

from __future__ import annotations

import sys
import sysconfig
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.metadata costs ~100 ms to import: only off the connect path
    import importlib.metadata

_STDLIB_PREFIXES = tuple({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]})
#: (sys.path when built, top-level module → (distribution, version))
_distributions: tuple[tuple[str, ...], dict[str, tuple[str, str]]] | None = None
_distributions_lock = threading.Lock()


def _top_level_names(dist: importlib.metadata.Distribution) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    names = set()
    for f in dist.files or ():
        parts = f.parts
        if not parts or parts[0].endswith((".dist-info", ".egg-info", ".data")) or \
                parts[0] in ("..", "__pycache__"):
            continue
        if len(parts) > 1 or parts[0].endswith(".py"):
            names.add(parts[0][:-3] if parts[0].endswith(".py") else parts[0])
    return names


def installed_distributions() -> dict[str, tuple[str, str]]:
    """Top-level module name → ``(distribution, version)`` of what is installed here (the
    first distribution found on ``sys.path`` wins, as imports do). Built once per
    ``sys.path`` (it reads every distribution's metadata: tens of milliseconds), in the
    checker thread, off the send path."""
    global _distributions
    path = tuple(sys.path)
    with _distributions_lock:
        if _distributions is None or _distributions[0] != path:
            import importlib.metadata

            found: dict[str, tuple[str, str]] = {}
            for dist in importlib.metadata.distributions():
                try:
                    name, version = dist.metadata["Name"], dist.version
                    tops = _top_level_names(dist)
                except Exception:  # broken metadata: skip that one
                    continue
                if not name or not version:
                    continue
                for top in tops:
                    if top.isidentifier():
                        found.setdefault(top, (name, version))
            _distributions = (path, found)
        return _distributions[1]


def local_distribution(module: str) -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed distribution that provides the imported
    top-level ``module`` here, or None (not imported, the standard library, this project's
    own code, or rpycsvc's own dependencies, whose versions the handshake covers)."""
    if module in EXEMPT or module in sys.builtin_module_names:
        return None
    mod = sys.modules.get(module)
    if mod is None:  # a pickle only names modules that are imported
        return None
    path = getattr(mod, "__file__", None) or ""
    if path.startswith(_STDLIB_PREFIXES) and "site-packages" not in path and \
            "dist-packages" not in path:
        return None
    return installed_distributions().get(module)


#: Checked by the handshake (rpyc), by the by-value check (cloudpickle), or rpycsvc itself.
EXEMPT = frozenset({"rpycsvc", "rpyc", "cloudpickle", "plumbum", "__main__", "builtins"})
