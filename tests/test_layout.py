"""The package's layout keeps its promises (issue 16): dependencies run one way, no import
circles, no oversized modules.

Read from the source with :mod:`ast` (every ``import``, including those inside functions and
under ``TYPE_CHECKING``, since each is a dependency a reader has to follow):

- ``rpycsvc/client/`` and ``rpycsvc/protocol/`` import nothing from ``server/``,
  ``deployment/`` or ``cli/``; ``protocol/`` imports nothing from ``client/`` either, nor
  ``server/`` from ``client/``; nothing but the command line imports ``cli/``;
- no two modules of the package import each other, directly or through others;
- no module is over :data:`MAX_LINES` lines unless :data:`LONG` names it with its reason.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import REPO

PACKAGE = REPO / "rpycsvc"
#: "about 500 lines": the line count above which a module needs a stated reason
MAX_LINES = 510
#: module -> why it is longer (none today; add one only with a reason a reviewer accepts)
LONG: dict[str, str] = {}


def module_name(path: Path) -> str:
    """``rpycsvc/server/pool.py`` -> ``rpycsvc.server.pool`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> Iterator[str]:
    """Every rpycsvc module ``name`` imports (resolved to a module of :data:`MODULES`)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("rpycsvc") and target != name:
                yield target


#: who imports whom; the top level ``rpycsvc`` is left out: it only re-exports the public
#: names of the modules below it, lazily (PEP 562), and nothing depends on it for code
GRAPH = {name: set(imports_of(name)) - {"rpycsvc"} for name in MODULES if name != "rpycsvc"}


def in_folder(module: str, folder: str) -> bool:
    return module == f"rpycsvc.{folder}" or module.startswith(f"rpycsvc.{folder}.")


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("client", ("server", "deployment", "cli")),
    ("protocol", ("server", "deployment", "cli", "client")),
    ("server", ("client", "deployment", "cli")),
])
def test_dependencies_run_one_way(folder: str, forbidden: tuple[str, ...]) -> None:
    wrong = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if in_folder(m, folder)
                   for t in targets if any(in_folder(t, f) for f in forbidden))
    assert not wrong, wrong


def test_only_the_command_line_imports_cli() -> None:
    wrong = sorted(f"{m} imports {t}" for m, targets in GRAPH.items()
                   if not in_folder(m, "cli") and m != "rpycsvc.__main__"
                   for t in targets if in_folder(t, "cli"))
    assert not wrong, wrong


def circles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles() -> None:
    assert circles() == []


def test_no_module_is_oversized() -> None:
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    over = {name: n for name, n in long.items() if n > MAX_LINES and name not in LONG}
    assert not over, f"split these into modules of one concept each, or say why in LONG: {over}"
