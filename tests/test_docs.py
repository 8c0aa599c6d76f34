"""The documentation holds together: the README stays a short front page, every relative link
in README.md and docs/*.md leads to a file that exists and, for a page, to a heading it has,
every docs page can be reached from the README, and the module map (docs/modules.md) is what
``tools/modulemap.py`` makes from the code today.

The code blocks of the same pages are run by ``tests/test_readme.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.servers import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES: list[Path] = [README, *sorted(DOCS.glob("*.md"))]
MODULEMAP = REPO / "tools" / "modulemap.py"
#: a newcomer reads the README in ten minutes: the rest belongs in docs/
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


# -- reading Markdown as GitHub renders it ----------------------------------------------------
def _blank(match: re.Match[str]) -> str:
    """What a removed piece of text leaves: its line breaks, so line numbers stay right."""
    return "\n" * match.group(0).count("\n")


def prose(text: str) -> str:
    """``text`` without fenced blocks, HTML comments and code spans (links there are not
    links), line for line."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
            continue
        lines.append("" if fenced else line)
    out = "\n".join(lines)
    out = re.sub(r"<!--.*?-->", _blank, out, flags=re.S)
    out = re.sub(r"``.+?``", _blank, out, flags=re.S)
    return re.sub(r"`[^`]*`", _blank, out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: links and code marks reduced to their text, lower
    case, punctuation but ``-`` and ``_`` dropped, spaces made ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated one gets ``-1``, ``-2``... as on GitHub)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every relative link on a page (not ``http:``, ``mailto:``...)."""
    out = []
    text = prose(page.read_text())
    for m in LINK.finditer(text):
        target = m.group("target")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # a URL with a scheme
            continue
        out.append((text.count("\n", 0, m.start("target")) + 1, target))
    return out


def broken_links(pages: list[Path], root: Path) -> list[str]:
    """Every relative link of ``pages`` that leads nowhere: a file or folder that doesn't
    exist (or is outside ``root``), or a ``#anchor`` its page has no heading for."""
    bad = []
    for page in pages:
        for line, target in links(page):
            where = f"{page.relative_to(root).as_posix()}:{line}: ({target})"
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if root.resolve() not in (dest, *dest.parents):
                bad.append(f"{where}: leads outside the repository")
            elif not dest.exists():
                bad.append(f"{where}: {dest.relative_to(root.resolve())} doesn't exist")
            elif anchor and dest.suffix != ".md":
                bad.append(f"{where}: an anchor into a file that is not a Markdown page")
            elif anchor and anchor not in anchors(dest):
                bad.append(f"{where}: {dest.name} has no heading with the anchor #{anchor}")
    return bad


# -- the pages ---------------------------------------------------------------------------------
def test_every_relative_link_resolves() -> None:
    """Links between README.md and docs/*.md (and to examples/, deploy/...) lead to files that
    exist, and their ``#anchors`` to headings those pages have: sections moved between pages
    must take their links along."""
    assert sum(len(links(p)) for p in PAGES) > 100  # the pages do link to each other
    bad = broken_links(PAGES, REPO)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_link_check_finds_what_is_broken(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing anchor, a file outside the tree, and the
    anchors GitHub gives headings with code, punctuation and repeats."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(textwrap.dedent("""\
        # A page
        ## `rpycsvc top`: a live view
        ## Errors
        ### Errors
        ```text
        # not a heading, and [not a link](nowhere.md)
        ```
        """))
    page = tmp_path / "README.md"
    page.write_text(textwrap.dedent("""\
        [fine](docs/a.md#rpycsvc-top-a-live-view) [fine too](docs/a.md#errors-1) [own](#b)
        [no file](docs/b.md) [no anchor](docs/a.md#not-a-heading)
        [outside](../elsewhere.md) `[in code](nowhere.md)` [web](https://example.com/x)
        <!-- [in a comment](nowhere.md) -->
        # B
        """))
    bad = broken_links([page, tmp_path / "docs" / "a.md"], tmp_path)
    assert [b.split(": (")[0] + " " + b.rsplit(": ", 1)[1].split()[0] for b in bad] == [
        "README.md:2 docs/b.md", "README.md:2 a.md", "README.md:3 leads"], bad


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    """Each docs/*.md is linked from the README or from docs/index.md, which the README
    links: a page nobody can find is lost content."""
    def targets(page: Path) -> set[Path]:
        return {(page.parent / t.partition("#")[0]).resolve()
                for _, t in links(page) if t.partition("#")[0]}

    assert (DOCS / "index.md").resolve() in targets(README)
    reached = targets(README) | targets(DOCS / "index.md")
    lost = [p.name for p in PAGES[1:] if p.resolve() not in reached and p.name != "index.md"]
    assert not lost, f"docs pages no link leads to: {lost}"


def test_readme_is_a_front_page() -> None:
    """The README stays short (the rest is in docs/), and its Quick start is the two commands
    CI runs as written (``.ci/run``): ``make demo`` and ``make test``."""
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES}: move detail to "
        "a page in docs/ and link it")
    start = lines.index("## Quick start")
    fence = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
    commands = [ln.split("#")[0].strip() for ln in lines[fence + 1:end]]
    assert commands == ["make demo", "make test"], commands
    ci = (REPO / ".ci" / "run").read_text()
    assert "\nmake demo\n" in ci and "\nmake test\n" in ci


# -- the module map ------------------------------------------------------------------------------
def modulemap(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(MODULEMAP), *args], capture_output=True,
                          text=True, timeout=120, cwd=str(cwd), stdin=subprocess.DEVNULL)


def test_module_map_is_current() -> None:
    """docs/modules.md is what tools/modulemap.py makes from rpycsvc/ now (CI runs this):
    after a module's docstring changes, or a module is added or moved, run
    ``python tools/modulemap.py`` and commit docs/modules.md."""
    proc = modulemap("--check")
    assert proc.returncode == 0, proc.stderr
    assert "docs/modules.md is up to date" in proc.stdout


def test_module_map_is_current_from_any_directory(tmp_path: Path) -> None:
    """The defaults are the repository's package and page, wherever it is started from."""
    proc = modulemap("--check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture()
def package(tmp_path: Path) -> Path:
    """A package with a subpackage two levels deep and a module without a docstring."""
    pkg = tmp_path / "pkg"
    (pkg / "server" / "pool").mkdir(parents=True)
    (pkg / "__pycache__").mkdir()
    (pkg / "__init__.py").write_text('"""The top.\n\nMore text."""\n')
    (pkg / "alpha.py").write_text(
        '"""``alpha``: first sentence, wrapped\nover two lines. Second sentence."""\n\nx = 1\n')
    (pkg / "bare.py").write_text("y = 2\n")
    (pkg / "__pycache__" / "stale.py").write_text('"""Not a module of the package."""\n')
    (pkg / "server" / "__init__.py").write_text('"""The server side (see :mod:`pkg.x`)."""\n')
    (pkg / "server" / "pool" / "__init__.py").write_text('"""Workers | and a pipe."""\n')
    (pkg / "server" / "pool" / "worker.py").write_text('"""Runs tasks."""\n' + "pass\n" * 9)
    return pkg


def test_module_map_walks_every_folder(package: Path, tmp_path: Path) -> None:
    """Each folder of the package, subpackages at any depth, gets a section listing its
    modules' docstring summaries and line counts; folder totals are in the table on top."""
    out = tmp_path / "modules.md"
    proc = modulemap("--package", str(package), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    sections = re.findall(r"^## `(.*)`$", text, re.M)
    assert sections == ["pkg/", "pkg/server/", "pkg/server/pool/"]
    assert "| `alpha.py` | 4 | `alpha`: first sentence, wrapped over two lines. |" in text
    assert "| `bare.py` | 1 | *(no docstring)* |" in text
    assert "| `__init__.py` | 1 | The server side (see `pkg.x`). |" in text
    assert "| `worker.py` | 10 | Runs tasks. |" in text
    assert "Workers \\| and a pipe." in text  # a table cell
    assert "stale.py" not in text
    assert "| [`pkg/server/pool/`](#pkgserverpool) | 2 | 11 |" in text
    assert "6 modules, 20 lines in 3 folders" in text
    assert not broken_links([out], tmp_path)  # the folder table's anchors are right


def test_module_map_check_says_what_is_stale(package: Path, tmp_path: Path) -> None:
    """``--check`` passes on a fresh map, fails (exit 1) after a docstring changes or a
    module moves, naming the line and what to run, writes nothing; a broken module is
    exit 2 naming the file."""
    out = tmp_path / "modules.md"
    missing = modulemap("--check", "--package", str(package), "--output", str(out))
    assert missing.returncode == 1 and "is missing" in missing.stderr, missing.stderr
    assert modulemap("--package", str(package), "--output", str(out)).returncode == 0
    fresh = modulemap("--check", "--package", str(package), "--output", str(out))
    assert fresh.returncode == 0, fresh.stderr

    before = out.read_text()
    (package / "alpha.py").write_text('"""A new summary."""\n')
    stale = modulemap("--check", "--package", str(package), "--output", str(out))
    assert stale.returncode == 1
    assert "is stale" in stale.stderr and "python tools/modulemap.py" in stale.stderr
    assert "+| `alpha.py` | 1 | A new summary. |" in stale.stderr, stale.stderr
    assert out.read_text() == before

    assert modulemap("--package", str(package), "--output", str(out)).returncode == 0
    (package / "server" / "pool" / "worker.py").rename(package / "server" / "worker.py")
    moved = modulemap("--check", "--package", str(package), "--output", str(out))
    assert moved.returncode == 1 and "worker.py" in moved.stderr, moved.stderr

    (package / "server" / "broken.py").write_text("def f(:\n")
    broken = modulemap("--check", "--package", str(package), "--output", str(out))
    assert broken.returncode == 2 and "broken.py" in broken.stderr, broken.stderr
