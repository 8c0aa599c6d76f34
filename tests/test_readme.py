"""Every example in README.md and in the pages of docs/ runs as written, and prints what the
page says it prints.

The pages are README.md and every ``docs/*.md`` (:data:`PAGES`; not the design notes in
``docs/design/``). "The README" below means any of them: a block and its marks are read the
same way wherever they are, and the test names each block by its page and line
(``docs/client.md:270``).

How the README's code blocks are treated
----------------------------------------
Every fenced ```` ```python ```` block is run, each group of blocks in a subprocess of its own,
unless HTML comments (invisible on GitHub) right above its fence say otherwise:

- ``<!-- readme-test: skip (REASON) -->``: not run; the reason is required (e.g. the block
  is another tool's code, shown for comparison).
- ``<!-- readme-test: continues -->``: a fragment that goes on from the python block before
  it on the same page: run after it, in the same process and namespace.
- ``<!-- readme-test: file NAME.py -->``: a module the README tells you to write: saved as
  NAME.py in a directory on the ``PYTHONPATH`` of the servers and of the blocks (the
  servers load ``mymod.py`` with ``--endpoints mymod``, as the README says).
- ``<!-- readme-test: project NAME -->``: the block's client has the package NAME of
  :data:`PROJECTS` (the files the README's comments describe) in a directory only on its
  own ``PYTHONPATH``: the servers, deployed ones included, can't import it (checked after
  the block ran), so the block shows module forwarding.
- ``<!-- readme-test: tls -->``: the TLS client: run by :func:`test_tls_certificates_work`
  against a server with the certificates the README's openssl commands make (run too).
- ``<!-- readme-test: given NAME, NAME -->``: the block uses names its surrounding text
  defines ("in the snippets, ``cluster`` is ``rpycsvc.Cluster([...])``"): they are defined
  first, as :data:`GIVEN` says, and the connections among them are closed afterwards.

The servers: the addresses in the README are replaced (:func:`substitutions`) by those of
real servers this module starts, once, on 127.0.0.1 port 0: ``A`` and ``B`` (2 workers each,
``--endpoints mymod --service shop:Shop``, registered with a registry this module starts,
as the README's registry and Pyro examples start theirs), and ``C`` (1 worker, not
registered). ``127.0.0.1:18812``, ``localhost:18812``, ``host:18812`` and ``host1:18812``
become A, ``host2:18812`` B, ``host3:18812`` C; the README's sample addresses
``127.0.0.1:40517`` and ``127.0.0.1:40991`` become A and B (A has the lower port, so the
sorted list ``discover`` returns is in the README's order); ``rpyc.classic.connect("host")``
connects to A; the registry port ``18811`` becomes this module's registry's port.
``Cluster.local(2)`` (and ``%rpycsvc local 2``) starts its own servers as written.

The hosts of the deploy examples become the suite's private sshd (the ``sshd`` fixture, ALIAS
its alias and CFG its client ssh config): ``rpycsvc.deploy``'s three hosts become ALIAS, with
``ssh_options=["-F", CFG]`` and 2 workers instead of 8; ``deploy(["build@gpu1"])`` becomes
``deploy([ALIAS], workers=1, ssh_options=["-F", CFG])``; plumbum's ``SshMachine("node1",
user="alice")``, ``SshMachine("node1")`` and ``SshMachine("node2")`` become
``SshMachine(ALIAS, ssh_opts=["-F", CFG])``, and the host string ``"node3:2222"`` beside them
ALIAS (with ``ssh_options=["-F", CFG]`` and 2 workers instead of 4);
``ParamikoMachine("node2", user="alice")`` connects to the sshd's address and port as this
user with the sshd's client key (``AutoAddPolicy`` for its host key, which no known_hosts
file holds); ``rpycsvc deploy ... --run job.py`` runs the README's job.py there. The
metrics example's port 9464 becomes 0 (a free one).

What is checked: each group runs to the end without an exception, and

- a ``print(...)`` statement with a comment prints exactly the comment's text (up to an
  em dash: ``print(x)  # {} — or ...`` must print ``{}``);
- an expression statement whose comment (up to an em dash or ``;``) is a Python literal
  evaluates to that literal (``fut.result(timeout=10)  # 6``); comments that aren't
  literals (``# {word: count}``, ``# an import path``) are prose and not checked;
- ``progress=True`` writes one summary line to stderr (not a terminal here) shaped as the
  README's sample (``1000/1000 done in 3.2s (312/s) | ADDRESS:COUNT ...``);
- a statement commented ``# prints here as "TEXT"`` (a task's output streamed back) prints
  the line TEXT, at most 30 s after it returns.

Tracebacks from a failing block name its page and its line there.

The samples of what rpycsvc prints are compared with what it prints: ``rpycsvc top``,
``rpycsvc status``, the "deployed to" line of ``rpycsvc deploy``, a task's output line,
the tree of exception classes under "Errors", the ``EnvironmentMismatchError`` message, and
the ``rpycsvc repl`` transcript (replayed through a pty, but for its Ctrl-C statement, which
``tests/test_repl.py`` covers).

Shell blocks (``sh``, ``console``) are not run (but for the openssl commands, which
:func:`test_tls_certificates_work` runs): every ``rpycsvc ...`` and ``bin/rpycsvc_classic ...``
command line in them must parse with the real parsers (``cli.build_parser()``, and
``cli.add_serve_arguments`` for ``rpycsvc_classic``), and every ```rpycsvc SUBCOMMAND ...```
code span in the text must name a real subcommand and only options it has.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import rpycsvc
from rpycsvc.cli import main as cli
from rpycsvc.client.discovery import discover
from tests.support.rendezvous import Gate, pass_gate
from tests.support.servers import REPO, ServerProcess
from tests.support.sshd import SshServer

README = REPO / "README.md"
#: the pages whose blocks run: the README, then the docs pages by name
PAGES: list[Path] = [README, *sorted((REPO / "docs").glob("*.md"))]
#: python blocks run: 21 before the README was split into docs/ pages, plus the tour, plus
#: the asyncio section; moving or rewriting pages must not lose any
MIN_RUN = 23
WAIT = 30.0
#: a group of blocks may start servers (Cluster.local) and run a grid search: generous
RUN_TIMEOUT = 240.0

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
MARK = re.compile(r"^\s*<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")

#: names a ``given`` mark may ask for, in the order they are defined; ``{A}`` etc. are filled
#: in. Each says what the README's text around such a block says the name is.
GIVEN: dict[str, str] = {
    "rpycsvc": "import rpycsvc",
    "rpyc": "import rpyc",
    "operator": "import operator",
    "hypot": "from math import hypot",
    "random": "from random import random",
    "cluster": "import rpycsvc\ncluster = rpycsvc.Cluster([{A!r}, {B!r}], timeout=10)",
    "client": "import rpycsvc\nclient = rpycsvc.connect({A!r}, timeout=10)",
    "f": "def f(x):\n    return x * x",
    "x": "x = 3",
    "xs": "xs = list(range(20))",
    "futs": "futs = [cluster.submit(f, x) for x in xs]",
    "numbers": "numbers = list(range(10))",
    "lines": "lines = ['the quick brown fox', 'jumps over the lazy dog', 'the end']",
    "data": "data = list(range(100))",
    "simulateWorkload": "def simulateWorkload(x):\n    return x * x",
    "step": "def step(n):\n    raise ValueError(f'step {{n}} failed')",
    "server": "import rpycsvc\n"
              "server = rpycsvc.Server(rpycsvc.ServerConfig(port=0, workers=1)).start()",
}
#: the packages ``project NAME`` marks give a block's client: file name -> text, as the
#: README's comments describe them
PROJECTS: dict[str, dict[str, str]] = {
    "myshop": {
        "__init__.py": "from .pricing import Receipt, total\n",
        "pricing.py": textwrap.dedent("""\
            from dataclasses import dataclass


            @dataclass
            class Receipt:
                amount: float
                rate: float


            def total(items):
                from . import tax

                return Receipt(sum(items) * (1 + tax.RATE), tax.RATE)
            """),
        "tax.py": "RATE = 0.2\n",
    },
}
#: run after a ``project`` block, by a client like the block's (the package on its path) but
#: with forwarding off: the servers the block could have used can't import the package
SERVERS_LACK = """
import rpycsvc

def lacks(name):
    return __import__("importlib.util").util.find_spec(name) is None

for address in {addresses!r}:
    with rpycsvc.connect(address, forward_modules=False) as c:
        assert c.compute(lacks, {name!r}), f"{{address}} can import {name}"
if {deploy!r}:
    with rpycsvc.deploy({deploy!r}, workers=1, ssh_options={ssh_options!r},
                        forward_modules=False, output="discard") as cluster:
        assert cluster.submit(lacks, {name!r}).result(60), "the deployed host can import {name}"
"""
#: run after a group, whatever happened: what ``GIVEN`` opened is closed
TEARDOWN = """
for _name in ("client", "cluster", "server"):
    if _name in globals():
        globals()[_name].close()
"""


# -- reading the README ----------------------------------------------------------------------
@dataclass
class Block:
    path: str  # its page, relative to the repository: "README.md", "docs/client.md"
    line: int  # the page's line of the code's first line
    lang: str
    code: str
    marks: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def mark(self, kind: str) -> str | None:
        """The text after ``kind`` of this block's ``kind`` mark, or None without one."""
        for m in self.marks:
            if m == kind or m.startswith(kind + " "):
                return m[len(kind):].strip()
        return None


def _rel(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def page_blocks(page: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of a page (indented ones in lists too), with their marks."""
    lines = (page.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        marks: list[str] = []
        j = i - 1
        while j >= 0 and (not lines[j].strip() or MARK.match(lines[j])):
            mm = MARK.match(lines[j])
            if mm:
                marks.insert(0, mm.group("body"))
            j -= 1
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        code = textwrap.dedent("\n".join(lines[i + 1:end])) + "\n"
        blocks.append(Block(_rel(page), i + 2, m.group("lang"), code, marks))
        i = end + 1
    return blocks


@dataclass
class Group:
    """Python blocks run together: one, and the blocks marked ``continues`` after it."""

    blocks: list[Block]
    given: list[str]

    @property
    def id(self) -> str:
        return self.blocks[0].where


def python_groups(blocks: list[Block]) -> tuple[list[Group], dict[str, Block], list[Block]]:
    """(groups to run, files by name, skipped blocks); raises on a mark it doesn't know."""
    groups: list[Group] = []
    files: dict[str, Block] = {}
    skipped: list[Block] = []
    last: Block | None = None
    for b in blocks:
        for m in b.marks:
            if not re.match(r"(skip \(.+\)|continues|tls|file \w+\.py|project \w+"
                            r"|given \w+(, \w+)*)$", m):
                raise AssertionError(f"{b.where}: unknown readme-test mark {m!r}")
        if b.lang != "python":
            if b.marks:
                raise AssertionError(f"{b.where}: readme-test marks on a {b.lang!r} block")
            continue
        given = [n.strip() for n in (b.mark("given") or "").split(",") if n.strip()]
        unknown = sorted(set(given) - set(GIVEN))
        assert not unknown, f"{b.where}: given names the test can't define: {unknown}"
        if b.mark("skip") is not None:
            skipped.append(b)
        elif b.mark("tls") is not None:
            files["<tls client>"] = b
        elif b.mark("file") is not None:
            name = str(b.mark("file"))
            assert name not in files, f"{b.where}: {name} is also {files[name].where}"
            files[name] = b
        elif b.mark("continues") is not None:
            assert (last is not None and last.path == b.path and groups
                    and groups[-1].blocks[-1] is last), (
                f"{b.where}: marked 'continues' but the python block before it on its page "
                "is not run")
            groups[-1].blocks.append(b)
            groups[-1].given += [n for n in given if n not in groups[-1].given]
        else:
            groups.append(Group([b], given))
        last = b
    return groups, files, skipped


BLOCKS = [b for page in PAGES for b in page_blocks(page)]
GROUPS, FILES, SKIPPED = python_groups(BLOCKS)


# -- the servers -------------------------------------------------------------------------------
@dataclass
class Servers:
    a: str
    b: str
    c: str
    registry_port: int
    workdir: Path
    env: dict[str, str]
    pid_a: int  # of A's server process


def substitutions(s: Servers, sshd: SshServer | None = None) -> list[tuple[str, str]]:
    """README text -> what the test runs instead, in this order (see the module docstring)."""
    port_a = s.a.rsplit(":", 1)[1]
    ssh: list[tuple[str, str]] = []
    if sshd is not None:
        alias, opts = repr(sshd.alias), f'["-F", {str(sshd.config_path)!r}]'
        machine = f"SshMachine({alias}, ssh_opts={opts})"
        ssh = [
            ('["alice@node1", "node2:2222", "gpu-box"], workers=8',
             f"[{alias}], workers=2, ssh_options={opts}"),
            ('rpycsvc.deploy(["build@gpu1"])',
             f"rpycsvc.deploy([{alias}], workers=1, ssh_options={opts})"),
            ('SshMachine("node1", user="alice")', machine),
            ('SshMachine("node1")', machine), ('SshMachine("node2")', machine),
            ('"node3:2222", local], workers=4', f"{alias}, local], workers=2, ssh_options={opts}"),
            ("from plumbum.machines.paramiko_machine import ParamikoMachine",
             "from plumbum.machines.paramiko_machine import ParamikoMachine\nimport paramiko"),
            ('ParamikoMachine("node2", user="alice")',
             f"ParamikoMachine({sshd.address!r}, user={sshd.user!r}, port={sshd.port}, "
             f"keyfile={str(sshd.key_path)!r}, load_system_host_keys=False, "
             "look_for_keys=False, missing_host_policy=paramiko.AutoAddPolicy(), "
             "connect_timeout=10)"),
        ]
    return [
        *ssh,
        ("start_http_server(9464,", "start_http_server(0,"),
        ("127.0.0.1:40517", s.a), ("127.0.0.1:40991", s.b),
        ("host1:18812", s.a), ("host2:18812", s.b), ("host3:18812", s.c),
        ("127.0.0.1:18812", s.a), ("localhost:18812", s.a), ("host:18812", s.a),
        ('rpyc.classic.connect("host")', f'rpyc.classic.connect("127.0.0.1", {port_a})'),
        ("18811", str(s.registry_port)),
    ]


def substitute(code: str, s: Servers, sshd: SshServer | None = None) -> str:
    for old, new in substitutions(s, sshd):
        code = code.replace(old, new)
    return code


def _start_registry(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rpycsvc.cli", "registry", "--port", "0", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env,
        cwd=str(REPO))
    from rpycsvc.client.local import read_address  # the same first-line protocol as serve

    try:
        return proc, int(read_address(proc, WAIT).rsplit(":", 1)[1])
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """A registry and servers A, B (registered) and C; the README's files in a directory on
    everyone's PYTHONPATH."""
    with tempfile.TemporaryDirectory(prefix="rpycsvc-readme-") as tmp:
        workdir = Path(tmp)
        for name, block in FILES.items():
            if name.endswith(".py"):  # not the "<tls client>" block
                (workdir / name).write_text(block.code)
        path = os.pathsep.join([str(workdir), str(REPO / "examples"), str(REPO)])
        env = dict(os.environ, PYTHONPATH=path)
        registry, reg_port = _start_registry(env)
        started: list[ServerProcess] = []
        try:
            for _ in range(2):
                started.append(ServerProcess(
                    "--workers", "2", "--endpoints", "mymod", "--service", "shop:Shop",
                    "--register", "--registry-type", "TCP", "--registry-host", "127.0.0.1",
                    "--registry-port", str(reg_port), env={"PYTHONPATH": path}))
            started.append(ServerProcess("--workers", "1", env={"PYTHONPATH": path}))
            first, second = sorted(started[:2], key=lambda p: p.port)
            a, b = first.address, second.address
            deadline = time.monotonic() + WAIT
            while discover("127.0.0.1", reg_port, timeout=5) != [a, b]:
                assert time.monotonic() < deadline, "the servers did not show in the registry"
                time.sleep(0.1)
            yield Servers(a, b, started[2].address, reg_port, workdir, env, first.pid)
        finally:
            for p in started:
                p.stop()
            registry.terminate()
            try:
                registry.wait(10)
            except subprocess.TimeoutExpired:
                registry.kill()
                registry.wait(10)
            if registry.stdout is not None:
                registry.stdout.close()


# -- running python blocks -----------------------------------------------------------------------
#: the subprocess: transforms each block (output checks), runs it in a fresh ``__main__``
RUNNER = r'''
import ast, contextlib, io, json, re, sys, tokenize, types

spec = json.loads(open(sys.argv[1]).read())
main = types.ModuleType("__main__")
main.__dict__["__builtins__"] = __builtins__
sys.modules["__main__"] = main
ns = main.__dict__


def head(comment):
    """A comment's claim: its text up to an em dash or a semicolon."""
    return comment.lstrip("#").split(" \u2014 ")[0].split("; ")[0].strip()


@contextlib.contextmanager
def _readme_capture(where, expected):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    sys.stdout.write(buf.getvalue())
    got = buf.getvalue().rstrip("\n")
    if got != expected:
        raise AssertionError(f"{where} prints {got!r}; the README says {expected!r}")


@contextlib.contextmanager
def _readme_shows(where, expected):
    """The statement's (task's) output must include the line ``expected``; a task's output
    may trail its result, so wait for it a while."""
    import time
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
            deadline = time.monotonic() + spec.get("shows_wait", 30.0)
            while expected not in buf.getvalue().splitlines() and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        sys.stdout.write(buf.getvalue())
    if expected not in buf.getvalue().splitlines():
        raise AssertionError(f"{where} printed {buf.getvalue()!r}; the README says "
                             f"it prints {expected!r}")


def _readme_value(where, expected, value):
    want = ast.literal_eval(expected)
    if value != want:
        raise AssertionError(f"{where} gives {value!r}; the README says {expected}")


ns["_readme_capture"], ns["_readme_value"] = _readme_capture, _readme_value
ns["_readme_shows"] = _readme_shows


def is_literal(text):
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return "..." not in text


class Checks(ast.NodeTransformer):
    def __init__(self, comments, page, offset):
        self.comments, self.page, self.offset = comments, page, offset

    def visit_Expr(self, node):
        comment = self.comments.get(node.end_lineno)
        if not comment:
            return node
        claim, line = head(comment), f"{self.page}:{node.lineno + self.offset}"
        call = node.value
        shows = re.match(r'prints here as "(.*)"$', claim)
        if shows:
            ctx = ast.Call(ast.Name("_readme_shows", ast.Load()),
                           [ast.Constant(line), ast.Constant(shows.group(1))], [])
            new = ast.With([ast.withitem(ctx, None)], [node])
        elif (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                and call.func.id == "print"):
            ctx = ast.Call(ast.Name("_readme_capture", ast.Load()),
                           [ast.Constant(line), ast.Constant(claim)], [])
            new = ast.With([ast.withitem(ctx, None)], [node])
        elif is_literal(claim):
            new = ast.Expr(ast.Call(ast.Name("_readme_value", ast.Load()),
                                    [ast.Constant(line), ast.Constant(claim), node.value], []))
        else:
            return node
        return ast.fix_missing_locations(ast.copy_location(new, node))


def compiled(page, code, first_line):
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
    tree = ast.parse(code, page)
    tree = Checks(comments, page, first_line - 1).visit(tree)
    ast.increment_lineno(tree, first_line - 1)
    return compile(ast.fix_missing_locations(tree), page, "exec")


try:
    exec(spec["prelude"], ns)
    for page, first_line, code in spec["blocks"]:
        exec(compiled(page, code, first_line), ns)
finally:
    exec(spec["teardown"], ns)
print("README-BLOCKS-OK", flush=True)
'''


def prelude(given: list[str], s: Servers) -> str:
    names = {"A": s.a, "B": s.b, "C": s.c}
    return "\n".join(GIVEN[n].format(**names) for n in GIVEN if n in given) + "\n"


def _group_params() -> list[object]:
    """A group that starts servers of its own (``Cluster.local``, ``%rpycsvc local``,
    ``deploy``) is slow."""
    return [pytest.param(g, id=g.id, marks=[pytest.mark.slow, pytest.mark.timeout(300)])
            if any(s in b.code for b in g.blocks
                   for s in ("Cluster.local(", "%rpycsvc local", "deploy("))
            else pytest.param(g, id=g.id) for g in GROUPS]


@pytest.mark.parametrize("group", _group_params())
def test_python_block_runs_as_written(group: Group, servers: Servers, tmp_path: Path,
                                      request: pytest.FixtureRequest) -> None:
    deploys = any("rpycsvc.deploy(" in b.code for b in group.blocks)
    sshd = request.getfixturevalue("sshd") if deploys else None  # skipped without sshd
    env = servers.env
    projects = [(b, str(b.mark("project"))) for b in group.blocks if b.mark("project")]
    if projects:  # packages only this client has (see PROJECTS)
        root = tmp_path / "project"
        for block, name in projects:
            assert name in PROJECTS, f"{block.where}: no PROJECTS[{name!r}]"
            for fname, text in PROJECTS[name].items():
                assert f"{name}/{fname}" in block.code, (
                    f"{block.where}: the comments don't describe {name}/{fname}")
                (root / name).mkdir(parents=True, exist_ok=True)
                (root / name / fname).write_text(text)
        env = dict(env, PYTHONPATH=os.pathsep.join([str(root), env["PYTHONPATH"]]))
    proc = run_blocks(prelude(group.given, servers),
                      [(b.path, b.line, substitute(b.code, servers, sshd)) for b in group.blocks],
                      tmp_path, servers.workdir, env)
    assert proc.returncode == 0 and "README-BLOCKS-OK" in proc.stdout, (
        f"{group.id} failed (exit {proc.returncode})\n--- stdout\n{proc.stdout}\n--- stderr\n"
        f"{proc.stderr}")
    for block, name in projects:  # ...and no server could have imported it by itself
        check = SERVERS_LACK.format(
            addresses=[servers.a, servers.b, servers.c], name=name,
            deploy=[sshd.alias] if sshd is not None else [],
            ssh_options=["-F", str(sshd.config_path)] if sshd is not None else [])
        (tmp_path / "lack").mkdir(exist_ok=True)
        lack = run_blocks("", [(block.path, block.line, check)], tmp_path / "lack",
                          servers.workdir, env)
        assert lack.returncode == 0 and "README-BLOCKS-OK" in lack.stdout, (
            f"{block.where}: a server can import {name} without forwarding\n"
            f"{lack.stdout}\n{lack.stderr}")
    # progress=True off a terminal: one summary line each, as the README's sample reads
    summaries = [ln for ln in proc.stderr.splitlines() if " done in " in ln]
    assert len(summaries) == sum(b.code.count("progress=True") for b in group.blocks), (
        proc.stderr)
    sample = re.search(r"`(\d+/\d+ done in [^`]+)`", "\n".join(p.read_text() for p in PAGES))
    assert sample is not None
    for line in summaries:
        assert _progress_shape(line) == _progress_shape(sample.group(1)), (line, sample)


def _progress_shape(line: str) -> str:
    """A progress summary line with its numbers and addresses generalised."""
    line = re.sub(r"127\.0\.0\.1:\d+:\d+( 127\.0\.0\.1:\d+:\d+)*", "ADDR:N ...", line)
    return re.sub(r"\d[\d,]*(\.\d+)?", "N", line)


def run_blocks(prelude_code: str, blocks: list[tuple[str, int, str]], tmp: Path, cwd: Path,
               env: dict[str, str], shows_wait: float = 30.0,
               ) -> subprocess.CompletedProcess[str]:
    """Run ``blocks`` ((page, line, code), ...) after ``prelude_code`` in one subprocess;
    a task's output that "prints here as" claims may trail it by ``shows_wait`` seconds."""
    spec = {"prelude": prelude_code, "teardown": TEARDOWN, "blocks": blocks,
            "shows_wait": shows_wait}
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "runner.py").write_text(RUNNER)
    return subprocess.run([sys.executable, str(tmp / "runner.py"), str(tmp / "spec.json")],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=str(cwd),
                          env=env, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("code", "error"), [
    ("print(1 + 1)  # 2 — prose after the dash\n1 + 1  # 2; prose after the semicolon\n"
     "1 + 1  # a comment that is not a literal\nx = 5  # an assignment: not checked\n", None),
    ("print(1 + 1)  # 3\n", "README.md:7 prints '2'; the README says '3'"),
    ("print('a')  # x\n", "README.md:7 prints 'a'; the README says 'x'"),
    ("print('b')  # prints here as \"a\"\n", "README.md:7 printed 'b\\n'; the README says it "
     "prints 'a'"),
    ("import os\nif True:\n    len('ab')  # 3 — nested statements are checked too\n",
     "README.md:9 gives 2; the README says 3"),
])
def test_claims_in_comments_are_checked(code: str, error: str | None, tmp_path: Path) -> None:
    """The runner itself: a wrong claim in a comment fails, at its README line."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = run_blocks("", [("README.md", 7, code)], tmp_path, tmp_path, env, shows_wait=0.5)
    if error is None:
        assert proc.returncode == 0 and "README-BLOCKS-OK" in proc.stdout, proc.stderr
    else:
        assert proc.returncode != 0 and error in proc.stderr, proc.stderr


def test_marks_are_few_and_say_why() -> None:
    """Every python block is run, a module, or skipped with a reason; skips stay few."""
    runs = sum(len(g.blocks) for g in GROUPS)
    assert runs + len(FILES) + len(SKIPPED) == sum(b.lang == "python" for b in BLOCKS)
    for b in SKIPPED:
        assert len(b.mark("skip") or "") > 10, f"{b.where}: say why it isn't run"
    assert runs > len(SKIPPED), "most examples must run"
    assert runs >= MIN_RUN, f"{runs} python blocks run, fewer than the {MIN_RUN} that did"
    assert "mymod.py" in FILES, "the servers load the README's mymod.py"
    assert "<tls client>" in FILES


# -- command lines -------------------------------------------------------------------------------
def _subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in cli.build_parser()._actions:
        if isinstance(action.choices, dict):  # the subparsers action: name -> parser
            return dict(action.choices)
    raise AssertionError("rpycsvc's parser has no subcommands")


def _classic_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpycsvc_classic")
    cli.add_serve_arguments(parser)
    return parser


def command_lines() -> list[tuple[str, bool, list[str]]]:
    """(page:line, whether it is a code span in the text, argv) of every rpycsvc command in
    shell blocks and in code spans."""
    found: list[tuple[str, bool, list[str]]] = []
    for b in BLOCKS:
        if b.lang not in ("sh", "console", "bash"):
            continue
        joined = b.code.replace("\\\n", " ")
        for k, raw in enumerate(joined.splitlines()):
            if b.lang == "console" and not raw.startswith("$ "):
                continue  # what the command printed
            text = raw[2:] if raw.startswith("$ ") else raw
            try:
                argv = shlex.split(text, comments=True)
            except ValueError:
                continue
            while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value before the command
                argv.pop(0)
            if argv and argv[-1] == "&":
                argv.pop()
            if argv and argv[0] in ("rpycsvc", "bin/rpycsvc_classic"):
                found.append((f"{b.path}:{b.line + k}", False, argv))
    for page in PAGES:
        in_fences = False
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if FENCE.match(line):
                in_fences = not in_fences
            if not in_fences:
                for span in re.findall(r"`(rpycsvc [a-z][^`]*)`", line):
                    found.append((f"{_rel(page)}:{n}", True, shlex.split(span.split("|")[0])))
    return found


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def test_command_lines_parse() -> None:
    """Each ``rpycsvc ...`` line shown uses real subcommands and options: a command line in
    a shell block parses as a whole; a code span in the text (``rpycsvc serve --metrics-port
    P``, with placeholders) names a real subcommand and only its options."""
    found = command_lines()
    assert len(found) > 20
    subcommands = _subcommands()
    bad = []
    for where, span, argv in found:
        if span:
            sub = subcommands.get(argv[1])
            unknown = [a.split("=")[0] for a in argv[2:]
                       if a.startswith("-") and sub is not None
                       and a.split("=")[0] not in _options(sub)]
            if sub is None or unknown:
                bad.append(f"{where}: {shlex.join(argv)}: not a subcommand or "
                           f"unknown options {unknown}")
            continue
        parser = _classic_parser() if argv[0].endswith("rpycsvc_classic") else cli.build_parser()
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(argv[1:])
        except SystemExit:
            bad.append(f"{where}: {shlex.join(argv)}: {err.getvalue().strip()}")
    assert not bad, "\n".join(bad)


# -- rpycsvc top and rpycsvc status -----------------------------------------------------------
def console_sample(command: str) -> list[str]:
    """The lines of the README's console sample of ``$ rpycsvc COMMAND ...``."""
    for b in BLOCKS:
        if b.lang == "console" and b.code.startswith(f"$ rpycsvc {command} "):
            return b.code.splitlines()[1:]
    raise AssertionError(f"no page has a console sample of rpycsvc {command}")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rpycsvc.cli", *args], capture_output=True,
                          text=True, timeout=WAIT * 2, cwd=str(REPO), env=env,
                          stdin=subprocess.DEVNULL)


def _shape(line: str) -> list[str]:
    """A line's words with numbers, times, addresses and the rest of a row generalised."""
    out = []
    for w in line.split():
        if re.fullmatch(r"\d+(\.\d+)?([A-Za-z]+\d*[a-z]*|/s|%)?|\d+:\d+:\d+|\d+/\d+|-", w):
            out.append("N")
        elif re.fullmatch(r"[\d.]+/[\d.]+/[\d.]+", w):  # rpycsvc/rpyc/python versions
            out.append("VERSIONS")
        elif re.fullmatch(r"127\.0\.0\.1:\d+", w):
            out.append("ADDR")
        else:
            out.append(w)
    return out


def test_top_shows_what_the_readme_shows(servers: Servers) -> None:
    """``rpycsvc top --once`` on a server with a running task and a failure has the
    README sample's title, sections and column headings, and rows of the same shape."""
    sample = console_sample("top")
    with rpycsvc.connect(servers.c, timeout=10) as c:
        with pytest.raises(ValueError):
            c.compute(int, "x;;")
        with Gate() as gate:
            held = c.submit(pass_gate, gate.port, "held")
            _, conn = gate.arrival()
            try:
                out = _cli("top", "--once", "--interval", "0.2", servers.c, env=servers.env)
            finally:
                gate.release(conn)
            assert held.result(timeout=WAIT) == "held"
    assert out.returncode == 0, out.stderr
    shown = out.stdout.splitlines()
    assert _shape(shown[0])[:2] + _shape(shown[0])[3:] == (
        _shape(sample[0])[:2] + _shape(sample[0])[3:]), (shown[0], sample[0])
    headings = [ln for ln in sample if ln[:1].isupper()]
    for heading in headings:
        if heading.startswith("RUNNING NOW"):
            assert "RUNNING NOW (1)" in shown
        else:
            assert any(ln.split() == heading.split() for ln in shown), (heading, out.stdout)
    server_row = next(ln for ln in shown if ln.startswith(servers.c))
    assert _shape(server_row) == _shape(next(ln for ln in sample if ln.startswith("127.")))
    task_row = next(ln for ln in shown if "pass_gate" in ln)
    assert _shape(task_row)[1:] == ["pass_gate", "ADDR", "process", "N"], task_row
    failure = next(ln for ln in shown if ln.rstrip().endswith("invalid literal for int() with "
                                                                "base 10: 'x;;'"))
    assert failure.split()[1:5] == ["ago", servers.c, "int", failure.split()[4]]
    assert "builtins.ValueError:" in failure.split()  # as the README's failure row shows
    # "--once ... exits (1 if a server is DOWN)"; "A server that stops answering is shown DOWN"
    down = _cli("top", "--once", "--interval", "0.2", "127.0.0.1:1", env=servers.env)
    assert down.returncode == 1, down.stdout + down.stderr
    assert any(ln.split()[:2] == ["127.0.0.1:1", "DOWN"] for ln in down.stdout.splitlines())


def test_status_shows_what_the_readme_shows(servers: Servers) -> None:
    """``rpycsvc status`` has the README sample's columns, DOWN row and summary line."""
    sample = console_sample("status")
    out = _cli("status", servers.a, servers.b, "127.0.0.1:1", env=servers.env)
    assert out.returncode == 1, out.stderr  # one server DOWN
    shown = out.stdout.splitlines()
    assert shown[0].split() == sample[0].split()
    assert _shape(shown[1])[:3] == _shape(sample[1])[:3]
    assert len(shown[1].split()) == len(sample[1].split())
    assert shown[3].split()[:3] == sample[3].split()[:3]  # 127.0.0.1:1 DOWN ConnectError:
    assert shown[-1] == sample[-1]


# -- rpycsvc deploy --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deploy_runs_job_py(servers: Servers, sshd: SshServer) -> None:
    """The README's ``rpycsvc deploy node1 node2 --run job.py``, on the suite's private sshd
    (its alias and ssh config instead of node1 and node2): the README's job.py prints 25,
    and the "deployed to" line reads as the README's sample."""
    assert "job.py" in FILES
    sample = next(ln for ln in console_sample("deploy") if ln.startswith("deployed to "))
    proc = subprocess.run(
        [sys.executable, "-m", "rpycsvc.cli", "deploy", sshd.alias, "-F", str(sshd.config_path),
         "--run", "job.py"], capture_output=True, text=True, timeout=RUN_TIMEOUT,
        cwd=str(servers.workdir), env=servers.env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "25\n", proc.stdout + proc.stderr
    deployed = next(ln for ln in proc.stderr.splitlines() if ln.startswith("deployed to "))
    assert re.sub(r"\d+(\.\d+)?", "N", deployed).split(":")[0] == (
        re.sub(r"\d+(\.\d+)?", "N", sample).split(":")[0]), (deployed, sample)
    assert deployed.endswith(f": {sshd.alias}")


# -- other samples of what rpycsvc prints -------------------------------------------------------
def _block_after(heading: str, lang: str | None = None) -> Block:
    """The first fenced block (in ``lang``, if given) after the line ``heading``, on the
    first page that has that line."""
    for page in PAGES:
        text = page.read_text().splitlines()
        if heading in text:
            start = text.index(heading) + 1
            return next(b for b in BLOCKS if b.path == _rel(page) and b.line > start
                        and lang in (None, b.lang))
    raise AssertionError(f"no page has the line {heading!r}")


def test_task_output_line_is_as_shown(servers: Servers) -> None:
    """The sample line under "Remote output": a task's print, prefixed with its server."""
    sample = substitute(_block_after("## Remote output").code, servers).strip()
    message = sample.split("] ", 1)[1]
    proc = subprocess.run(
        [sys.executable, "-c", "import rpycsvc, sys\n"
         "with rpycsvc.connect(sys.argv[1], timeout=10) as c:\n"
         "    c.compute(print, sys.argv[2])\n", servers.a, message],
        capture_output=True, text=True, timeout=WAIT * 2, env=servers.env,
        stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [sample], proc.stdout


def test_error_tree_is_the_class_tree() -> None:
    """Under "Errors": each class exists in rpycsvc, derives from the one above it, and is
    also what "(also a X)" says."""
    tree = _block_after("## Errors").code.splitlines()
    assert tree[0] == "RpycsvcError"
    parents: list[type] = [rpycsvc.RpycsvcError]
    seen = 1
    for line in tree[1:]:
        m = re.match(r"^((?:[│ ]   )*)[├└]── (\w+)(.*)$", line)
        assert m, f"not a tree line: {line!r}"
        depth = len(m.group(1)) // 4 + 1
        cls = getattr(rpycsvc, m.group(2))
        del parents[depth:]
        assert issubclass(cls, parents[-1]), f"{cls.__name__} is not a {parents[-1].__name__}"
        for also in re.findall(r"also an? (\w+)", m.group(3)):
            base = getattr(rpycsvc, also, None) or getattr(builtins, also)
            assert issubclass(cls, base), f"{cls.__name__} is not a {also}"
        parents.append(cls)
        seen += 1
    assert seen >= 15


def test_environment_mismatch_sample_is_the_message() -> None:
    """The sample under "Environment checks", unwrapped, is the message
    ``EnvironmentMismatchError`` has for its versions (a task function from a 3.11.7 client to
    a 3.9.18 server; ``tests/test_environment.py`` raises it from a server of another CPython)."""
    from rpycsvc.client.environment import mismatch_message

    sample = _block_after("### Environment checks", "text")
    shown = " ".join(sample.code.split("\n")).strip()
    assert shown == mismatch_message(
        "127.0.0.1:18812", {"python": "3.11.7", "cloudpickle": "3.1.3"},
        {"python": "3.9.18", "cloudpickle": "3.1.3"}, "a task function")


# -- TLS -----------------------------------------------------------------------------------------
def test_tls_certificates_work(tmp_path: Path) -> None:
    """The README's openssl commands make certificates that pass ``openssl verify
    -x509_strict`` and this Python's TLS, and its TLS client block connects with them (mutual
    TLS) to ``rpycsvc serve --ssl-certfile ... --ssl-cafile ca.pem``. Only the names change:
    the server certificate also names IP:127.0.0.1, the client connects to 127.0.0.1."""
    commands = next(b for b in BLOCKS if b.lang == "sh" and b.code.startswith("# 1. A CA."))
    script = commands.code.replace("IP:192.0.2.10", "IP:192.0.2.10, IP:127.0.0.1")
    made = subprocess.run(["bash", "-e", "-c", script], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=WAIT * 2, stdin=subprocess.DEVNULL)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "server.pem: OK" in made.stdout and "client.pem: OK" in made.stdout, made.stdout
    with ServerProcess("--workers", "1", "--ssl-certfile", str(tmp_path / "server.pem"),
                       "--ssl-keyfile", str(tmp_path / "server.key"),
                       "--ssl-cafile", str(tmp_path / "ca.pem")) as srv:
        block = FILES["<tls client>"]
        code = block.code.replace('"compute1.example.com", 18812', f'"127.0.0.1", {srv.port}')
        assert code != block.code
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        proc = run_blocks("", [(block.path, block.line, code)], run_dir, tmp_path,
                          dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0 and "README-BLOCKS-OK" in proc.stdout, proc.stderr


# -- the REPL transcript ------------------------------------------------------------------------
def test_repl_transcript_is_what_the_repl_shows(servers: Servers, tmp_path: Path) -> None:
    """The README's ``rpycsvc repl`` transcript, typed into ``rpycsvc repl`` on a pty: the
    banner, each statement's output (the session's parent is the server; the hostname,
    pids and address are this machine's), the ``...`` continuation, ``input()``. The
    Ctrl-C statement is left out (``tests/test_repl.py`` presses Ctrl-C at a known moment)."""
    pexpect = pytest.importorskip("pexpect")
    sample = console_sample("repl")
    node = os.uname().nodename
    inputrc = tmp_path / "inputrc"
    inputrc.write_text("set enable-bracketed-paste off\n")
    env = dict(servers.env, HOME=str(tmp_path), TERM="dumb", INPUTRC=str(inputrc))
    child = pexpect.spawn(sys.executable, ["-m", "rpycsvc.cli", "repl", "--no-history",
                                           servers.a], env=env, cwd=str(REPO),
                          encoding="utf-8", timeout=WAIT, dimensions=(24, 250))
    try:
        child.expect_exact(">>> ")
        banner = str(child.before).strip().splitlines()[-1]
        want = re.escape(sample[0].replace("127.0.0.1:40517", servers.a)
                         .replace("(host vm,", f"(host {node},"))
        assert re.fullmatch(want.replace("11502", r"\d+"), banner), (banner, sample[0])
        steps: list[tuple[list[str], list[str]]] = []  # (lines typed, lines shown)
        for line in sample[1:]:
            if line.startswith(">>> "):
                steps.append(([line[4:]], []))
            elif line.startswith("..."):
                steps[-1][0].append(line[4:])
            else:
                steps[-1][1].append(line.replace("11476", str(servers.pid_a))
                                    .replace("hello from vm", f"hello from {node}"))
        replayed = 0
        for typed, shown in steps:
            if "sleep" in typed[0]:
                continue  # the Ctrl-C statement
            asked = [ln for ln in shown if ln.startswith("your name? ")]
            for ln in typed:
                child.sendline(ln)
            if asked:  # input(): its prompt on a line of its own, then what we type
                child.expect_exact("\r\nyour name? ")
                child.sendline(asked[0][len("your name? "):])
                shown = [ln for ln in shown if ln not in asked]
            child.expect_exact(">>> ")
            got = [ln.rstrip() for ln in str(child.before).replace("\r", "").splitlines()]
            assert got[len(got) - len(shown):] == shown, (typed, got, shown)
            replayed += 1
        assert replayed == 4
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.close()
