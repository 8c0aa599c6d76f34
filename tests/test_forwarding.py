"""Module forwarding: a package that exists only on the client runs on servers that lack it.

Each test writes a three-module package into ``tmp_path`` (relative imports, a submodule the
task imports lazily, a dataclass result) and runs a client *in a subprocess* that puts it on
its own ``sys.path`` only after its servers started, so no server can import it (each test
checks that, with forwarding off). The servers are real: ``Cluster.local``, ``rpycsvc serve``
processes, and a host deployed over the suite's private sshd.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.servers import ServerProcess
from tests.support.sshd import SshServer

REPO = Path(__file__).resolve().parent.parent

#: The client script's prologue: argv[1] is the project directory, argv[2] the package
#: name; ``report(**kw)`` prints one JSON line the test reads.
PROLOGUE = """
import importlib, json, os, sys, time
import rpycsvc
PROJECT, PKG = sys.argv[1], sys.argv[2]
EXTRA = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
def report(**kw):
    print("REPORT " + json.dumps(kw), flush=True)
def use_project():
    sys.path.insert(0, PROJECT)
    return importlib.import_module(PKG)
def outcome(call, *args, **kw):
    try:
        return ["ok", repr(call(*args, **kw))]
    except Exception as exc:
        return ["error", type(exc).__name__, str(exc)]
def set_rate(rate, note):
    with open(os.path.join(PROJECT, PKG, "tax.py"), "w") as f:
        f.write(f"RATE = {rate!r}\\nNOTE = {note!r}\\n")
"""


def write_package(root: Path, name: str, rate: float = 0.5, note: str = "v1") -> Path:
    """The three-module package ``name`` under ``root``."""
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .pricing import Receipt, total\n")
    (pkg / "pricing.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass


        @dataclass
        class Receipt:
            amount: float
            note: str


        def total(items):
            from . import tax  # lazily, inside the task

            return Receipt(sum(items) * (1 + tax.RATE), tax.NOTE)


        def rates():  # data files of the package, through importlib.resources
            import sys
            from importlib import resources

            legacy = resources.read_text(__package__, "rates.txt")
            if sys.version_info < (3, 10):  # 3.9's files() asks no loader, only the disk
                return legacy, ["rates.txt"]
            here = resources.files(__package__) / "data"
            return legacy, [p.name for p in here.iterdir()] + [(here / "more.txt").read_text()]


        def peek(path):
            from importlib.resources import files

            return (files(__package__) / path).read_text()
        """))
    (pkg / "tax.py").write_text(f"RATE = {rate!r}\nNOTE = {note!r}\n")
    (pkg / "data").mkdir()
    (pkg / "rates.txt").write_text("standard 0.2\n")
    (pkg / "data" / "more.txt").write_text("reduced 0.1\n")
    (root / "secret.txt").write_text("not in the package\n")
    (pkg / ".env").write_text("TOKEN=not-for-servers\n")
    return root


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, str]:
    name = f"fwdshop_{uuid.uuid4().hex[:8]}"
    return write_package(tmp_path / "proj", name), name


def run_client(body: str, project: tuple[Path, str], extra: Any = None,
               timeout: float = 90.0) -> list[dict[str, Any]]:
    """Run ``PROLOGUE + body`` as a client process; its REPORT lines, parsed."""
    root, name = project
    argv = [sys.executable, "-c", PROLOGUE + textwrap.dedent(body), str(root), name,
            json.dumps(extra or {})]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(REPO))
    reports = [json.loads(line[7:]) for line in proc.stdout.splitlines()
               if line.startswith("REPORT ")]
    assert proc.returncode == 0, f"client failed:\n{proc.stdout}\n{proc.stderr}"
    return reports


def merged(reports: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in reports:
        out.update(r)
    return out


def receipt(amount: float, note: str) -> list[str]:
    return ["ok", f"Receipt(amount={amount!r}, note={note!r})"]


def test_cluster_local_runs_a_package_only_the_client_has(project: tuple[Path, str]) -> None:
    got = merged(run_client("""
        with rpycsvc.Cluster.local(1, workers=1, output="discard") as cluster:
            pkg = use_project()  # after the servers started: they don't have it
            address = cluster.addresses[0]
            with rpycsvc.connect(address, forward_modules=False) as plain:
                report(without=outcome(plain.compute, "importlib:import_module", PKG))
            report(submit=outcome(lambda: cluster.submit(pkg.total, [1, 2]).result(60)))
            client = cluster.clients[0]
            report(compute=outcome(client.compute, pkg.total, [2, 2]),
                   path=outcome(client.compute, PKG + ".pricing:total", [4]),
                   thread=outcome(client.options(mode="thread").compute, pkg.total, [2]),
                   mapped=outcome(lambda: list(cluster.map(pkg.total, [[1], [2], [3]]))))
            with rpycsvc.connect(address) as second:  # a connection of its own
                report(second=outcome(second.compute, pkg.total, [6]))
    """, project))
    assert got["without"][:2] == ["error", "ModuleNotFoundError"], got["without"]
    assert project[1] in got["without"][2]
    assert got["submit"] == receipt(4.5, "v1")
    assert got["compute"] == receipt(6.0, "v1")
    assert got["path"] == receipt(6.0, "v1")
    assert got["thread"] == receipt(3.0, "v1")
    assert got["second"] == receipt(9.0, "v1")
    assert got["mapped"][0] == "ok" and got["mapped"][1].count("Receipt(") == 3


def test_an_edited_module_is_forwarded_again(
    project: tuple[Path, str], server_process: type[ServerProcess]
) -> None:
    srv = server_process("--workers", "1")
    reports = run_client("""
        pkg = use_project()
        with rpycsvc.connect(EXTRA["address"]) as c:
            with rpycsvc.connect(EXTRA["address"], forward_modules=False) as plain:
                report(without=outcome(plain.compute, pkg.total, [1]))
            report(first=outcome(c.compute, pkg.total, [2]), pid1=c.compute(os.getpid),
                   resources=outcome(c.compute, pkg.pricing.rates),
                   outside=outcome(c.compute, pkg.pricing.peek, "../secret.txt"),
                   dotfile=outcome(c.compute, pkg.pricing.peek, ".env"))
            set_rate(1.0, "v2")
            report(edited=outcome(c.compute, pkg.total, [2]), pid2=c.compute(os.getpid))
            set_rate(2.0, "v3")
            report(thread=outcome(c.options(mode="thread").compute, pkg.total, [2]))
            set_rate(3.0, "v4")
            report(thread_edited=outcome(c.options(mode="thread").compute, pkg.total, [2]))
    """, project, {"address": srv.address})
    got = merged(reports)
    assert got["without"][:2] == ["error", "SerializationError"], got["without"]
    assert "No module named" in got["without"][2]
    assert got["first"] == receipt(3.0, "v1")
    if sys.version_info >= (3, 10):
        assert got["resources"] == ["ok", repr(("standard 0.2\n",
                                                ["more.txt", "reduced 0.1\n"]))]
        assert got["outside"][0] == "error" and "bad resource path" in got["outside"][2]
        assert got["dotfile"][0] == "error" and "hidden file" in got["dotfile"][2], got
    else:
        assert got["resources"] == ["ok", repr(("standard 0.2\n", ["rates.txt"]))]
    assert got["edited"] == receipt(4.0, "v2")
    assert got["pid1"] == got["pid2"]  # the same worker, its modules re-fetched
    assert got["thread"] == receipt(6.0, "v3")
    assert got["thread_edited"] == receipt(8.0, "v4")


def test_clients_with_different_versions_never_share_a_worker_s_modules(
    tmp_path: Path, server_process: type[ServerProcess]
) -> None:
    name = f"fwdshop_{uuid.uuid4().hex[:8]}"
    one = (write_package(tmp_path / "one", name, 0.5, "one"), name)
    two = (write_package(tmp_path / "two", name, 1.0, "two"), name)
    srv = server_process("--workers", "1")
    body = """
        pkg = use_project()
        with rpycsvc.connect(EXTRA["address"]) as c:
            report(got=outcome(c.compute, pkg.total, [2]), pid=c.compute(os.getpid))
    """
    runs = [merged(run_client(body, p, {"address": srv.address})) for p in (one, two, one)]
    assert [r["got"] for r in runs] == [receipt(3.0, "one"), receipt(4.0, "two"),
                                        receipt(3.0, "one")]
    assert len({r["pid"] for r in runs}) == 1  # one worker served all three


def test_installed_packages_and_c_extensions_are_not_forwarded(
    project: tuple[Path, str], server_process: type[ServerProcess]
) -> None:
    root, _ = project
    # An installed pure-Python distribution the server lacks: a site-packages of our own.
    site = root.parent / "site-packages"
    dist = f"fwddist_{uuid.uuid4().hex[:6]}"
    (site / dist).mkdir(parents=True)
    (site / dist / "__init__.py").write_text("def answer():\n    return 42\n")
    info = site / f"{dist}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "top_level.txt").write_text(f"{dist}\n")
    (info / "RECORD").write_text(f"{dist}/__init__.py,,\n")
    # A C extension of the project (never loaded on the client: the name is enough).
    ext = f"fwdext_{uuid.uuid4().hex[:6]}"
    (root / f"{ext}{__import__('importlib.machinery').machinery.EXTENSION_SUFFIXES[0]}") \
        .write_bytes(b"\x7fELF not really")
    srv = server_process("--workers", "1")
    got = merged(run_client("""
        use_project()
        sys.path.append(EXTRA["site"])
        with open(os.path.join(PROJECT, f"probe_{PKG}.py"), "w") as f:
            f.write("import importlib.util\\n"
                    "def probe(name):\\n"
                    "    return importlib.util.find_spec(name) is None\\n")
        with rpycsvc.connect(EXTRA["address"]) as c:
            report(dist=outcome(c.compute, "importlib:import_module", EXTRA["dist"]),
                   ext=outcome(c.compute, "importlib:import_module", EXTRA["ext"]),
                   probe=outcome(c.compute, f"probe_{PKG}:probe", EXTRA["dist"]),
                   probe_ext=outcome(c.compute, f"probe_{PKG}:probe", EXTRA["ext"]))
        with rpycsvc.connect(EXTRA["address"], forward_packages=[EXTRA["dist"]]) as c:
            report(opted=outcome(c.compute, EXTRA["dist"] + ":answer"))
        with rpycsvc.Cluster([EXTRA["address"]], forward_packages=[EXTRA["dist"]]) as cluster:
            report(cluster=outcome(lambda: cluster.submit(EXTRA["dist"] + ":answer").result(60)))
    """, project, {"address": srv.address, "site": str(site), "dist": dist, "ext": ext}))
    assert got["dist"][:2] == ["error", "ModuleNotFoundError"], got["dist"]
    assert f"pip install {dist}==1.2.3" in got["dist"][2]
    assert "forward_packages" in got["dist"][2]
    assert got["ext"][:2] == ["error", "ModuleNotFoundError"], got["ext"]
    assert ext in got["ext"][2] and "C extension" in got["ext"][2]
    # An optional-dependency probe on the server says "absent", as without forwarding.
    assert got["probe"] == ["ok", "True"] and got["probe_ext"] == ["ok", "True"], got
    assert got["opted"] == ["ok", "42"]
    assert got["cluster"] == ["ok", "42"]  # (Cluster passes forward_packages on)


@pytest.mark.ssh
def test_a_deployed_host_runs_a_package_only_the_client_has(
    project: tuple[Path, str], sshd: SshServer, capsys: pytest.CaptureFixture[str]
) -> None:
    got = merged(run_client("""
        opts = ["-F", EXTRA["config"]]
        with rpycsvc.deploy([EXTRA["alias"]], ssh_options=opts, timeout=60, workers=1,
                            output="discard") as cluster:
            pkg = use_project()
            client = cluster.clients[0]
            report(server_lacks=client.eval(
                f"__import__('importlib.util').util.find_spec({PKG!r}) is None"))
            client.compute(sum, [1, 2])  # the worker's own first task: not ours to count
            t0 = time.perf_counter()
            first = outcome(client.compute, pkg.total, [2])
            t1 = time.perf_counter()
            later = []
            for _ in range(5):
                t = time.perf_counter()
                client.compute(pkg.total, [2])
                later.append(time.perf_counter() - t)
            t = time.perf_counter()
            client.compute(sum, [1, 2])
            plain = time.perf_counter() - t
            set_rate(1.0, "v2")
            report(first=first, first_s=t1 - t0, later_s=sorted(later)[len(later) // 2],
                   plain_s=plain, edited=outcome(client.compute, pkg.total, [2]),
                   mapped=outcome(lambda: list(cluster.map(pkg.total, [[1], [2]]))))
    """, project, {"config": str(sshd.config_path), "alias": sshd.alias}, timeout=110))
    assert got["server_lacks"] is True
    assert got["first"] == receipt(3.0, "v1")
    assert got["edited"] == receipt(4.0, "v2")
    assert got["mapped"] == ["ok", "[Receipt(amount=2.0, note='v2'), "
                             "Receipt(amount=4.0, note='v2')]"]
    with capsys.disabled():
        print(f"\n[forwarding on a deployed host] first task {got['first_s'] * 1000:.1f} ms, "
              f"later tasks {got['later_s'] * 1000:.1f} ms (median of 5), a task using no "
              f"project module {got['plain_s'] * 1000:.1f} ms")



def test_a_client_that_does_not_answer_fails_the_import_in_time(
    project: tuple[Path, str], server_process: type[ServerProcess]
) -> None:
    # The server's workers wait 2 s for a module; this client takes 6 s to answer.
    srv = server_process("--workers", "1", env={"RPYCSVC_FORWARD_TIMEOUT": "2"})
    got = merged(run_client("""
        from rpycsvc.protocol import module_provider
        slow = module_provider.provider()
        answer = slow.answer
        slow.answer = lambda name: (time.sleep(6), answer(name))[1]  # a client stuck
        pkg = use_project()
        with rpycsvc.connect(EXTRA["address"]) as c:
            t = time.monotonic()
            report(stuck=outcome(c.compute, pkg.total, [2]), took=time.monotonic() - t)
            report(after=outcome(c.compute, sum, [1, 2]))  # the connection still works
    """, project, {"address": srv.address}))
    assert got["stuck"][:2] == ["error", "SerializationError"], got["stuck"]
    assert "did not send module" in got["stuck"][2] and project[1] in got["stuck"][2]
    assert got["took"] < 60  # bounded by the 2 s wait (plus the 6 s the client is stuck)
    assert got["after"] == ["ok", "3"]


#: Helpers a client writes into its project: a task that starts a thread which imports a
#: module later (after the task returned), and a task that waits for a flag file first.
LATE_IMPORTS = '''
import os, threading, time


def wait_for(path, limit=60.0):
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def start(name, out, flag=None):
    def body():
        if flag:
            wait_for(flag)
        try:
            result = "ok " + str(__import__(name).VALUE)
        except BaseException as exc:
            result = type(exc).__name__ + ": " + str(exc)
        with open(out + ".tmp", "w") as f:
            f.write(result)
        os.replace(out + ".tmp", out)
    threading.Thread(target=body).start()
    return "started"


def after(flag, name):
    wait_for(flag)
    return os.getpid(), __import__(name).VALUE


def hold(seconds, flag=None):
    if flag:  # (says that this task runs now)
        open(flag, "w").close()
    time.sleep(seconds)
    return "held"


def pooled(name):
    # A thread pool that outlives the task that made it (kept where a forwarded module
    # being dropped does not take it), as a module-level executor does.
    import sys
    from concurrent.futures import ThreadPoolExecutor
    pool = getattr(sys, "_rpycsvc_test_pool", None)
    if pool is None:
        pool = sys._rpycsvc_test_pool = ThreadPoolExecutor(1)
    return os.getpid(), pool.submit(lambda: __import__(name).VALUE).result(60)
'''


def test_a_thread_importing_after_its_task_returned_never_takes_the_next_task(
    project: tuple[Path, str], server_process: type[ServerProcess]
) -> None:
    # A task's thread imports a forwarded module just as the task returns. It used to read
    # the worker's channel alongside the worker's main loop: the next task's
    # message went to the thread and that task never ran.
    srv = server_process("--workers", "1", env={"RPYCSVC_FORWARD_TIMEOUT": "5"})
    got = merged(run_client("""
        import threading
        use_project()
        for i in range(8):
            with open(os.path.join(PROJECT, f"late_{PKG}_{i}.py"), "w") as f:
                f.write(f"VALUE = {i}\\n")
        with open(os.path.join(PROJECT, f"late_{PKG}.py"), "w") as f:
            f.write(EXTRA["helpers"])
        out = os.path.join(PROJECT, "out")
        os.mkdir(out)

        def bounded(fn, *args):
            box = []
            t = threading.Thread(target=lambda: box.append(outcome(fn, *args)), daemon=True)
            t.start()
            t.join(40)
            return box[0] if box else "HANG"

        c = rpycsvc.connect(EXTRA["address"])
        trials = []
        for i in range(8):
            a = bounded(c.compute, f"late_{PKG}:start", f"late_{PKG}_{i}", f"{out}/{i}")
            b = bounded(c.compute, sum, [i, 1]) if a != "HANG" else "HANG"
            trials.append([a, b])
            if "HANG" in (a, b):
                break
        deadline = time.monotonic() + 30
        while len(os.listdir(out)) < len(trials) and time.monotonic() < deadline:
            time.sleep(0.1)
        threads = sorted(open(os.path.join(out, n)).read() for n in os.listdir(out))
        report(trials=trials, threads=threads)
        os._exit(0)  # (a hung call's thread would keep us alive)
    """, project, {"address": srv.address, "helpers": LATE_IMPORTS},
        timeout=400))
    for i, (a, b) in enumerate(got["trials"]):
        assert a == ["ok", "'started'"] and b == ["ok", str(i + 1)], got["trials"]
    assert len(got["trials"]) == 8
    # Each thread's import either got the module (the task was still running) or failed
    # at once as for any missing module; none waited for a reply that went elsewhere.
    assert len(got["threads"]) == 8, got["threads"]
    for line in got["threads"]:
        assert line.startswith(("ok ", "ModuleNotFoundError: No module named")), line


def test_a_pool_thread_of_an_earlier_task_imports_for_the_same_client_only(
    tmp_path: Path, server_process: type[ServerProcess]
) -> None:
    # A thread pool made by a client's first task (a module-level executor) is used by its
    # later tasks: their pool thread imports forwarded modules as the first task's did
    # (it used to fail: every thread alive after a task counted as another task's). For
    # another client's task that thread still gets nothing, and the error says why.
    name = f"fwdshop_{uuid.uuid4().hex[:8]}"
    projects = {}
    for who in "AB":
        root = write_package(tmp_path / who, name)
        (root / f"late_{name}.py").write_text(LATE_IMPORTS)
        for mod in ("first", "second", "third"):
            (root / f"{mod}_{name}.py").write_text(f"VALUE = {who + mod!r}\n")
        projects[who] = (root, name)
    srv = server_process("--workers", "1")
    body = """
        use_project()
        with rpycsvc.connect(EXTRA["address"]) as c:
            report(got=[outcome(c.compute, f"late_{PKG}:pooled", f"{mod}_{PKG}")
                        for mod in EXTRA["mods"]])
    """
    a = merged(run_client(body, projects["A"], {
        "address": srv.address, "mods": ["first", "second", "third"]}))
    pids = {eval(r[1])[0] for r in a["got"] if r[0] == "ok"}
    assert [r[0] for r in a["got"]] == ["ok"] * 3, a["got"]
    assert [eval(r[1])[1] for r in a["got"]] == ["Afirst", "Asecond", "Athird"]
    assert len(pids) == 1  # one worker, one pool thread, three tasks
    b = merged(run_client(body, projects["B"], {
        "address": srv.address, "mods": ["second"]}))
    assert b["got"][0][:2] == ["error", "ModuleNotFoundError"], b["got"]
    assert "earlier task of another client" in b["got"][0][2], b["got"]
    assert "Bsecond" not in b["got"][0][2] and "Asecond" not in b["got"][0][2]


def _pending_at_clients(port: int) -> bool:
    """Whether a TCP connection to local port ``port`` has unread bytes at its client end
    (``/proc/net/tcp``: the remote side is the server's port, the receive queue not empty)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if int(cols[2].rsplit(":", 1)[1], 16) == port and int(cols[4].split(":")[1], 16):
                return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGSTOP and /proc/net/tcp")
def test_a_frozen_client_s_fetch_does_not_hold_up_other_tasks_imports(
    project: tuple[Path, str], server_process: type[ServerProcess]
) -> None:
    # Client A's thread-mode task imports a module A must send, and A is frozen. Client
    # B's task, in the same worker, imports something unrelated: the import system calls
    # finders under its global lock, and the fetch used to wait for A holding it, so B's
    # import waited for A's fetch to time out.
    import signal

    forward_timeout = 30.0
    srv = server_process("--workers", "1", env={"RPYCSVC_FORWARD_TIMEOUT": str(forward_timeout)})
    root, name = project
    (root / f"late_{name}.py").write_text(LATE_IMPORTS)
    (root / f"held_{name}.py").write_text("VALUE = 1\n")
    started, go = root / "started", root / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    a = subprocess.Popen([sys.executable, "-c", PROLOGUE + textwrap.dedent("""
        use_project()
        c = rpycsvc.connect(EXTRA["address"]).options(mode="thread")
        c.compute(f"late_{PKG}:hold", 0, EXTRA["started"])
        os.remove(EXTRA["started"])
        f = c.submit(f"late_{PKG}:after", EXTRA["go"], f"held_{PKG}")  # waits for `go`
        c.compute(f"late_{PKG}:hold", 0, EXTRA["started"])  # (the worker has both)
        report(a=outcome(f.result, 120))
    """), str(root), name, json.dumps({"address": srv.address, "started": str(started),
                                       "go": str(go)})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
    port = int(srv.address.rsplit(":", 1)[1])
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and a.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), a.communicate(timeout=30)
        os.kill(a.pid, signal.SIGSTOP)
        go.touch()
        # A's task now asks A for `held_...`: wait until the request sits unread at A.
        deadline = time.monotonic() + 20
        while not _pending_at_clients(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        b = merged(run_client("""
            def probe(name):
                try:
                    __import__(name)
                except ImportError as exc:
                    return type(exc).__name__
            with rpycsvc.connect(EXTRA["address"], forward_modules=False) as conn:
                c = conn.options(mode="thread")
                report(b=outcome(c.compute, probe, f"nothing_here_{PKG}"))
        """, project, {"address": srv.address}, timeout=120))
        waited = time.monotonic() - t0
        assert b["b"] == ["ok", "'ModuleNotFoundError'"], b
        assert waited < forward_timeout / 2, f"B's import waited {waited:.1f} s for A's fetch"
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
        a.communicate(timeout=30)


def test_a_module_edited_while_another_worker_imports_it_is_never_stale(
    project: tuple[Path, str], server_process: type[ServerProcess]
) -> None:
    # Worker 1 imports v1; the file is edited; worker 2 then imports it (v2): the client
    # must tell worker 1 to drop its v1 before the next task runs there.
    srv = server_process("--workers", "2")
    got = merged(run_client("""
        use_project()
        mod = f"ver_{PKG}"
        with open(os.path.join(PROJECT, mod + ".py"), "w") as f:
            f.write("VALUE = 1\\n")
        with open(os.path.join(PROJECT, f"late_{PKG}.py"), "w") as f:
            f.write(EXTRA["helpers"])
        flag = os.path.join(PROJECT, "edited")
        with rpycsvc.connect(EXTRA["address"]) as c:
            first = c.submit(f"late_{PKG}:after", PROJECT, mod)  # (the flag: the dir)
            second = c.submit(f"late_{PKG}:after", flag, mod)  # waits for the edit
            one = first.result(60)
            time.sleep(2.5)  # (past the client's window for same-size edits)
            with open(os.path.join(PROJECT, mod + ".py"), "w") as f:
                f.write("VALUE = 2  # edited\\n")
            open(flag, "w").close()
            two = second.result(60)
            time.sleep(2.5)
            later = [f.result(60) for f in
                     [c.submit(f"late_{PKG}:after", flag, mod) for _ in range(8)]]
            report(one=one, two=two, later=later)
    """, project, {"address": srv.address, "helpers": LATE_IMPORTS}))
    assert got["one"][1] == 1 and got["two"][1] == 2
    assert got["one"][0] != got["two"][0]  # two workers: one holds v1, the other v2
    assert [v for _, v in got["later"]] == [2] * 8, got["later"]


def test_a_thread_of_one_client_s_task_never_gets_another_client_s_module(
    tmp_path: Path, server_process: type[ServerProcess]
) -> None:
    # Client A's task starts a thread and returns; the thread imports `who` while client
    # B's task runs on the same worker. It must not get B's `who`.
    name = f"fwdshop_{uuid.uuid4().hex[:8]}"
    projects = {}
    for who in "AB":
        root = write_package(tmp_path / who, name)
        (root / f"who_{name}.py").write_text(f"VALUE = {who!r}\n")
        (root / f"late_{name}.py").write_text(LATE_IMPORTS)
        projects[who] = (root, name)
    srv = server_process("--workers", "1")
    out, flag = tmp_path / "out", tmp_path / "b-runs"
    body = """
        use_project()
        with rpycsvc.connect(EXTRA["address"]) as c:
            report(got=outcome(lambda: c.submit(*EXTRA["call"]).result(60)),
                   pid=c.compute(os.getpid))
    """
    a = merged(run_client(body, projects["A"], {"address": srv.address, "call": [
        f"late_{name}:start", f"who_{name}", str(out), str(flag)]}))
    assert a["got"] == ["ok", "'started'"]
    b = merged(run_client(body, projects["B"], {"address": srv.address, "call": [
        f"late_{name}:hold", 4, str(flag)]}))
    assert b["got"] == ["ok", "'held'"] and b["pid"] == a["pid"]
    deadline = time.monotonic() + 30
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    result = out.read_text()
    assert "B" not in result
    assert result.startswith("ModuleNotFoundError: No module named"), result


def test_a_server_gets_nothing_from_the_client_outside_its_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A server may ask the client for modules for as long as the connection lasts. A
    # hostile one (plain RPyC here, speaking rpycsvc's hello and task messages) asks with
    # no task of ours running: for a module no task imported, and for a dotfile of a package.
    import platform
    import queue
    import socket
    import threading

    import rpyc

    from rpycsvc.client.opening import connect_stream
    from rpycsvc.protocol.channel import FastChannel
    from rpycsvc.protocol.sending import send_task
    from rpycsvc.protocol.socket_stream import FastSocketStream

    name = f"fwdhostile_{uuid.uuid4().hex[:8]}"
    root = write_package(tmp_path / "proj", name)
    (root / f"{name}_settings.py").write_text("PASSWORD = 'hunter2'\n")
    monkeypatch.syspath_prepend(str(root))
    offered: list[Any] = []
    answers: queue.Queue[tuple[Any, ...]] = queue.Queue()

    class Hostile(rpyc.SlaveService):  # type: ignore[misc]
        def exposed_hello(self, heartbeat: Any = None,
                          modules: Any = False) -> tuple[tuple[str, Any], ...]:
            offered.append(modules)
            return (("classic", True), ("python", platform.python_version()))

        hello = exposed_hello  # (classic: raw names)

    class Answers:  # what the client sends back: the hostile server's task messages
        def on_task(self, control: tuple[Any, ...], frames: list[Any]) -> None:
            answers.put(control)

        def on_task_refused(self, control: tuple[Any, ...], text: str) -> None:
            answers.put(("refused", text))

    theirs, ours = socket.socketpair()
    channel = FastChannel(FastSocketStream(theirs))
    channel.task_handler = Answers()
    server = Hostile._connect(channel, {"allow_public_attrs": True})
    threading.Thread(target=server.serve_all, daemon=True).start()
    try:
        client = connect_stream(FastSocketStream(ours), address="hostile:1", lost_after=None)
        try:
            assert offered == [True]  # the client offers modules: the server may ask
            wanted = [f"{name}_settings", name, f"resource:{name}:.env"]
            with caplog.at_level("WARNING", logger="rpycsvc.forwarding"):
                for req, module in enumerate(wanted, start=1):
                    send_task(server, ("need", req, 999, module))
                got = {}
                for _ in wanted:
                    control = answers.get(timeout=30)
                    assert control[0] == "module", control
                    got[control[1]] = control[2]
            settings, package, dotfile = (got[req] for req in (1, 2, 3))
        finally:
            client.close()
    finally:
        server.close()
    for reply in (settings, package, dotfile):
        assert reply[0] == "error" and "no task of this client is running" in reply[2], reply
    assert "hunter2" not in repr(settings) and "not-for-servers" not in repr(dotfile)
    assert caplog.text.count("refused") == 3, caplog.text
