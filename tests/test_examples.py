"""Every example runs as docs/coming-from.md shows it (``python examples/NAME.py``), as a
subprocess, once on the local servers it starts itself and once on servers already running;
its output is checked, and no process it started may outlive it."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Callable

import psutil
import pytest

from tests.support.servers import REPO, ServerProcess

EXAMPLES = REPO / "examples"
RUN_TIMEOUT = 240.0  # scikit-learn's examples take minutes on a busy 2-core machine
SLOW = pytest.mark.slow


def run_example(name: str, *args: str) -> str:
    """``python examples/NAME.py ARGS``: its stdout, after checking it exited 0 and left
    no process behind (children are found by a marker in their environment)."""
    token = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=str(REPO), RPYCSVC_EXAMPLE_RUN=token)
    try:
        proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args],
                              capture_output=True, text=True, timeout=RUN_TIMEOUT,
                              cwd=str(REPO), env=env, stdin=subprocess.DEVNULL)
    finally:
        leftovers = _wait_gone(token, timeout=10.0)
        for p in leftovers:
            p.kill()
    assert proc.returncode == 0, (
        f"{name} exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n"
        f"{proc.stderr}")
    assert not leftovers, f"{name} left processes running: {leftovers}"
    return proc.stdout


def _marked(token: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("RPYCSVC_EXAMPLE_RUN") == token:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def _wait_gone(token: str, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = _marked(token)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# -- what each example must print ------------------------------------------------------------
def check_task_queue_map(out: str) -> None:
    put = [int(n) for n in re.findall(r"Put task (\d+)\.\.\.", out)]
    results = [tuple(map(int, m)) for m in re.findall(r"Result: (\d+) \* (\d+) = (\d+)", out)]
    assert len(put) == 10
    assert [a for a, _, _ in results] == put  # map keeps the input order
    assert all(a == b and a * b == sq for a, b, sq in results)
    ran = re.findall(r"\[127\.0\.0\.1:\d+\] run task (\d+) \* \1\.\.\.", out)
    assert sorted(map(int, ran)) == sorted(put)  # the workers' prints arrived here


def check_task_queue_shared(out: str) -> None:
    put = [int(n) for n in re.findall(r"Put task (\d+)\.\.\.", out)]
    results = [tuple(map(int, m)) for m in re.findall(r"Result: (\d+) \* (\d+) = (\d+)", out)]
    assert len(put) == 10
    assert sorted(a for a, _, _ in results) == sorted(put)
    assert all(a == b and a * b == sq for a, b, sq in results)
    assert re.search(r"did 1 task and disconnected; 9 tasks still queued", out)
    done = [int(n) for n in re.findall(r"worker on 127\.0\.0\.1:\d+ did (\d+) tasks", out)]
    assert len(done) == 2 and sum(done) == 9


def check_celery_tasks(out: str) -> None:
    assert re.search(r"add\.delay\(5, 7\) -> task id [0-9a-f]{32}\n", out)
    assert "add.delay(5, 7).result(timeout=10) = 12\n" in out
    assert "ready: True\n" in out
    assert re.search(r"add\.apply_async\(\(2, 3\), timeout=5\) = 5 \(task id [0-9a-f]{32}\)", out)
    assert "add(1, 1) = 2 (called directly" in out
    assert "nap.delay(0.1) = 0.1\n" in out
    assert "nap.delay(30) stopped by its time limit: TaskTimeoutError" in out
    assert "nap.apply_async((1.5,), timeout=5) = 1.5\n" in out


def check_scoop_pi(out: str) -> None:
    assert re.search(r"1000000 darts in 200 tasks on \d+ workers in [\d.]+ s", out)
    pi = float(re.search(r"pi = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    assert abs(pi - math.pi) < 0.1


def check_scoop_mapreduce(out: str) -> None:
    expected = sum(a * a for a in range(200))
    parallel = re.search(r"Executed in parallel on \d+ workers in [\d.]+ s with result: (\d+)", out)
    serial = re.search(r"Executed serially in [\d.]+ s with result: (\d+)", out)
    assert parallel and serial, out
    assert int(parallel.group(1)) == int(serial.group(1)) == expected


def _shipped_text() -> str:
    path = EXAMPLES / "disco_wordcount.py"
    spec = importlib.util.spec_from_file_location("disco_wordcount", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.TEXT)


def check_disco_wordcount(out: str) -> None:
    # Counted here independently of the example's own mapper: letters only, lower case.
    text = "".join(c if c.isalpha() else " " for c in _shipped_text().lower())
    expected = Counter(text.split())
    assert expected["that"] == 13 and expected["the"] == 11 and sum(expected.values()) == 272
    head, _, rest = out.partition("== sorted alphabetically ==\n")
    alphabetical, _, by_count = rest.partition("== sorted by count ==\n")
    assert f"272 words, {len(expected)} distinct, in 18 lines" in head
    assert alphabetical.splitlines() == [f"{w} {n}" for w, n in sorted(expected.items())]
    assert by_count.splitlines() == [
        f"{w} {n}" for w, n in sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))]


def check_pyro_shop(out: str) -> None:
    assert "alice deposits 50 -> balance 50\n" in out
    assert "alice buys 2 book -> 26 left\n" in out
    assert "bob buys 1 lamp -> refused: bob has 20 euros; 1 lamp cost 30\n" in out
    assert "balances: alice 22, bob 5\n" in out
    assert "inventory: apple 1x46, book 12x3, lamp 30x2, mug 5x7\n" in out


def check_pyro_chain(out: str) -> None:
    hops = re.findall(r"([ABC]) \(pid (\d+)\)", out.split("path:", 1)[1].splitlines()[0])
    assert [name for name, _ in hops] == ["A", "B", "C", "A"]
    pids = [int(pid) for _, pid in hops]
    assert pids[0] == pids[3] and len(set(pids)) == 3  # three servers, back to the first
    assert "the chain is closed: the message came back to A" in out


def check_rpyc_tutorial(out: str) -> None:
    server_pid = int(re.search(r"server: pid (\d+)", out).group(1))  # type: ignore[union-attr]
    client_pid = int(re.search(r"this client: pid (\d+)", out).group(1))  # type: ignore[union-attr]
    assert server_pid != client_pid
    assert "conn.eval('1 + 2') = 3\n" in out
    assert f"Hello World, printed by server pid {server_pid}\n" in out  # arrived here
    assert "Hello from the server" not in out  # printed before the redirection: stayed there


def check_joblib_sklearn(out: str) -> None:
    assert re.search(r"rpycsvc: 80 fits on \d+ workers of 2 servers in [\d.]+ s\n", out), out
    ran = [int(n) for n in re.findall(r"127\.0\.0\.1:\d+ ran (\d+) tasks", out)]
    assert len(ran) == 2 and sum(ran) > 0  # the servers' own counters: the work ran there
    best = re.findall(r"(?:rpycsvc|loky) best parameters: (.*)\n", out)
    assert len(best) == 2 and best[0] == best[1], out
    assert "same answer: True\n" in out


def check_notebook_magics(out: str) -> None:
    pid = re.search(r"^session pid (\d+) on ", out, re.M)
    assert pid, out
    assert "still there: remote cells keep state\n4\n" in out  # the session kept `words`
    hello = re.findall(r"^\[(127\.0\.0\.1:\d+)\] hello from pid (\d+)$", out, re.M)
    assert len({a for a, _ in hello}) == 2, out  # every server, each line named
    assert pid.group(1) in {p for _, p in hello}  # %%broadcast used the same sessions
    assert "squares: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]\n" in out
    assert "HTML card names every server: True\n" in out


def check_asyncio_fanout(out: str) -> None:
    def steps(n: int) -> int:
        k = 0
        while n != 1:
            n, k = (3 * n + 1 if n % 2 else n // 2), k + 1
        return k
    assert "collatz_steps(27) = 111" in out
    assert "longest below 100: 97" in out
    assert "longest below 100,000: 77031 (350 steps)" in out
    assert f"steps summed over 1..1000: {sum(map(steps, range(1, 1001)))}" in out
    assert "slow(60) timed out after 0.5 s; it was stopped on its server" in out
    done = [int(n) for n in re.findall(r"^  \S+: (\d+) tasks done$", out, re.M)]
    assert len(done) == 2 and sum(done) >= 102, out
    assert "the ticker ran on while we awaited" in out


CHECKS: dict[str, Callable[[str], None]] = {
    "asyncio_fanout": check_asyncio_fanout,
    "notebook_magics": check_notebook_magics,
    "joblib_sklearn": check_joblib_sklearn,
    "task_queue_map": check_task_queue_map,
    "task_queue_shared": check_task_queue_shared,
    "celery_tasks": check_celery_tasks,
    "scoop_pi": check_scoop_pi,
    "scoop_mapreduce": check_scoop_mapreduce,
    "disco_wordcount": check_disco_wordcount,
    "pyro_shop": check_pyro_shop,
    "pyro_chain": check_pyro_chain,
    "rpyc_tutorial": check_rpyc_tutorial,
}
#: Longer than about 3 s each (time limits, sleeps, the registry's shutdown poll).
SLOW_ONES = {"celery_tasks", "scoop_mapreduce", "pyro_shop", "joblib_sklearn"}
#: How many of the running servers each example is given.
SERVERS_NEEDED = {"pyro_chain": 3, "pyro_shop": 1, "rpyc_tutorial": 1}


def _params() -> list[object]:
    # A slow one may take RUN_TIMEOUT on a busy machine: pytest-timeout's default is shorter.
    slow = [SLOW, pytest.mark.timeout(RUN_TIMEOUT + 60)]
    return [pytest.param(n, marks=slow) if n in SLOW_ONES else n for n in CHECKS]


def test_every_example_is_checked() -> None:
    shipped = {p.stem for p in EXAMPLES.glob("*.py")} - {"shop", "chain"}  # hosted classes
    assert shipped == set(CHECKS)


@pytest.mark.parametrize("name", _params())
def test_example_on_local_servers(name: str) -> None:
    CHECKS[name](run_example(name))


@pytest.fixture(scope="module")
def running_servers() -> Iterator[list[str]]:
    """Three servers as ``rpycsvc serve`` runs them, hosting the examples' classes."""
    args = ("--workers", "1", "--service", "examples.shop:Shop", "--service", "examples.chain:Link")
    procs: list[ServerProcess] = []
    try:
        for _ in range(3):
            procs.append(ServerProcess(*args))
        yield [p.address for p in procs]
    finally:
        for p in procs:
            p.stop()


class RegistryProcess(ServerProcess):
    """``rpycsvc registry --port 0`` as a child process, read and stopped like a server."""

    def __init__(self, timeout: float = 30.0) -> None:  # not super(): that runs `serve`
        cmd = [sys.executable, "-m", "rpycsvc.cli", "registry", "--port", "0", "-q"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, cwd=str(REPO),
                                     env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.address = self._read_address(timeout)
        self.port = int(self.address.rsplit(":", 1)[1])


@SLOW
def test_pyro_shop_through_a_running_registry() -> None:
    with RegistryProcess() as registry, ServerProcess(
            "--workers", "1", "--service", "examples.shop:Shop", "--register",
            "--registry-type", "TCP", "--registry-host", "127.0.0.1",
            "--registry-port", str(registry.port)) as server:
        out = run_example("pyro_shop", "--registry", registry.address)
    assert f"found 'shop' at {server.address} through the registry at {registry.address}" in out
    check_pyro_shop(out)


@pytest.mark.parametrize("name", _params())
def test_example_on_running_servers(name: str, running_servers: list[str]) -> None:
    # pyro_shop runs once per module fixture, so the shop starts fresh
    CHECKS[name](run_example(name, *running_servers[:SERVERS_NEEDED.get(name, 2)]))
