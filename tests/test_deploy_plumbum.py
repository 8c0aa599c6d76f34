"""rpycsvc.deploy on plumbum machines (SshMachine, ParamikoMachine, plumbum.local), against
the suite's real private sshd, down to /proc (the "remote" host is this machine).

A machine keeps its own connection open (plumbum holds a shell session on it), so "nothing
of ours is left on the host" means: the deployed server and its workers are gone, and the
sshd runs no session beyond the machine's own; once the machine is closed, none at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import rpycsvc
from rpycsvc.errors import AllServersFailedError, ConfigError, DeployError
from tests.support.byvalue import tasks_by_value  # noqa: F401 (an autouse fixture)
from tests.support.sshd import SshServer, pid_alive, process_tree

plumbum = pytest.importorskip("plumbum")
paramiko = pytest.importorskip("paramiko")
from plumbum import SshMachine, local  # noqa: E402
from plumbum.machines.paramiko_machine import ParamikoMachine  # noqa: E402

ssh = pytest.mark.ssh



def pids() -> tuple[int, int]:
    return os.getpid(), os.getppid()


def square(x: int) -> int:
    return x * x


# -- machines for the suite's sshd ---------------------------------------------------------------
def ssh_machine(srv: SshServer) -> Any:
    """A SshMachine through the sshd's own client config (key, port, pinned host key)."""
    return SshMachine(srv.alias, ssh_opts=["-F", str(srv.config_path)])


class _PinnedHostKey(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
    """Accept exactly the private sshd's host key (paramiko keys known_hosts by address and
    port, not by our alias): anything else is refused, as StrictHostKeyChecking would."""

    def __init__(self, srv: SshServer) -> None:
        assert srv.dir is not None
        self.expected = (srv.dir / "host_key.pub").read_text().split()[:2]

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        if [key.get_name(), key.get_base64()] != self.expected:
            raise paramiko.SSHException(f"host key of {hostname} is not the test sshd's")


def paramiko_machine(srv: SshServer) -> Any:
    return ParamikoMachine(
        srv.address,
        user=srv.user,
        port=srv.port,
        keyfile=str(srv.key_path),
        load_system_host_keys=False,
        look_for_keys=False,
        missing_host_policy=_PinnedHostKey(srv),
        connect_timeout=10,
    )


MACHINES: dict[str, Callable[[SshServer], Any]] = {
    "SshMachine": ssh_machine,
    "ParamikoMachine": paramiko_machine,
}


@pytest.fixture(params=sorted(MACHINES))
def machine(request: pytest.FixtureRequest, sshd: SshServer) -> Iterator[Any]:
    """A fresh machine of each kind; closed (and its sessions checked gone) at teardown."""
    m = MACHINES[request.param](sshd)
    try:
        yield m
    finally:
        m.close()
    assert wait_sessions_within(sshd, set()) == set(), "the machine's session outlived it"


# -- helpers (as tests/test_deploy.py) ------------------------------------------------------------
def sessions(srv: SshServer) -> set[int]:
    """Processes under the sshd listener: per-connection sshds and what they run."""
    assert srv.pid is not None
    return {pid for pid, _ in process_tree(srv.pid) if pid != srv.pid and pid_alive(pid)}


def wait_sessions_within(srv: SshServer, allowed: set[int], timeout: float = 15.0) -> set[int]:
    """Poll until the sshd runs nothing beyond ``allowed`` (bounded); return the extra ones."""
    deadline = time.monotonic() + timeout
    while (extra := sessions(srv) - allowed) and time.monotonic() < deadline:
        time.sleep(0.02)
    return extra


def wait_gone(procs: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


def server_pids(cluster: rpycsvc.Cluster, which: int | str = 0) -> list[int]:
    """The deployed server of ``cluster[which]`` and every worker process it runs."""
    stats = cluster[which].stats()
    found = [stats["pid"], *stats["worker_pids"], stats.get("thread_worker_pid")]
    return [p for p in found if p]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# -- the tests -------------------------------------------------------------------------------------
@ssh
def test_a_machine_deploys_runs_a_map_and_leaves_nothing(sshd: SshServer, machine: Any) -> None:
    own = sessions(sshd)  # the machine's own session(s)
    assert own, "plumbum keeps a session open on its machine"
    name = str(machine).split("://", 1)[1]
    with rpycsvc.deploy([machine], timeout=30) as cluster:
        assert cluster.addresses == [name] and cluster.unreachable == {}
        procs = server_pids(cluster)
        assert len(procs) >= 2, procs
        assert procs[0] in sessions(sshd), "the server runs under the sshd, as the user"
        assert list(cluster.map(square, range(20), timeout=30)) == [x * x for x in range(20)]
        assert cluster.submit(pids).result(timeout=30)[1] == procs[0]
        # deploy picked the host's python3.X of this client's version (the sshd's PATH has it)
        assert cluster[0].eval("__import__('sys').version_info[:2]") == sys.version_info[:2]
    assert wait_gone(procs) == [], "the server or a worker outlived the with block"
    assert wait_sessions_within(sshd, own) == set(), "a session of ours outlived the block"
    # The machine is still the caller's, and still works.
    assert machine["echo"]("still here").strip() == "still here"


@ssh
def test_a_machine_with_a_changed_environment_and_cwd(
    sshd: SshServer, machine: Any, tmp_path: Path
) -> None:
    # plumbum runs "cd DIR && env K=V <our command>" then: the server must start under both.
    machine.env["RPYCSVC_PLUMBUM_MARK"] = "marked"
    machine.cwd.chdir(str(tmp_path))
    with rpycsvc.deploy(machine, timeout=30) as cluster:
        os_ = cluster[0].modules.os
        assert os_.environ.get("RPYCSVC_PLUMBUM_MARK") == "marked"
        assert os_.getcwd() == str(tmp_path)
        procs = server_pids(cluster)
        assert sum(cluster.map(square, range(5), timeout=30)) == 30
    assert wait_gone(procs) == []


@ssh
def test_a_missing_python_on_a_machine_is_named(sshd: SshServer, machine: Any) -> None:
    own = sessions(sshd)
    name = str(machine).split("://", 1)[1]
    with pytest.raises(AllServersFailedError) as info:
        rpycsvc.deploy([machine], python="python3-does-not-exist", timeout=30)
    cause = info.value.causes[name]
    assert isinstance(cause, DeployError) and cause.host == name
    assert "python not found" in str(cause) and "python3-does-not-exist" in str(cause)
    assert name in str(cause)
    assert wait_sessions_within(sshd, own) == set()


@ssh
def test_machines_and_host_strings_mix(sshd: SshServer) -> None:
    m = ssh_machine(sshd)
    try:
        own = sessions(sshd)
        cluster = rpycsvc.deploy(
            [sshd.alias, m, local], ssh_options=["-F", str(sshd.config_path)], timeout=30
        )
        try:
            # the SshMachine reaches the same alias: its server gets a numbered name
            assert cluster.addresses == [sshd.alias, f"{sshd.alias}#2", "local"]
            servers = {a: server_pids(cluster, a)[0] for a in cluster.addresses}
            assert len(set(servers.values())) == 3
            for address, server in servers.items():  # each one runs tasks
                assert cluster[address].submit(pids).result(timeout=30)[1] == server
            assert sum(cluster.map(square, range(30), chunksize=1, timeout=30)) == 8555
        finally:
            procs = [p for a in cluster.addresses for p in server_pids(cluster, a)]
            cluster.close()
        assert wait_gone(procs) == []
        assert wait_sessions_within(sshd, own) == set()
    finally:
        m.close()


@ssh
def test_ctrl_c_while_deploying_to_a_machine_leaves_nothing_running(
    sshd: SshServer, machine: Any, tmp_path: Path
) -> None:
    # The start waits at a gate (a fifo) until we open it: Ctrl-C lands mid-deploy.
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    python = ["sh", "-c", f'read _ < {gate}; exec "$@"', "sh", "python3"]
    waiting, finished = threading.Event(), threading.Event()

    def at_the_gate() -> bool:
        return any(f"read _ < {gate}" in _cmdline(p) for p in sessions(sshd))

    def interrupt_at_the_gate() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not finished.is_set():
            if at_the_gate():
                waiting.set()
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: KeyboardInterrupt in our thread
                return
            time.sleep(0.02)

    interrupter = threading.Thread(target=interrupt_at_the_gate, daemon=True)
    try:
        own = sessions(sshd)
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            rpycsvc.deploy([machine], python=python, timeout=25)
        assert waiting.is_set()
        # Let the start go on, as a slow host would after the Ctrl-C (ENXIO: nobody reads yet).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and at_the_gate():
            try:
                fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                time.sleep(0.02)
                continue
            os.write(fd, b"go\n")
            os.close(fd)
            break
        assert wait_sessions_within(sshd, own, timeout=10) == set(), "a server outlived Ctrl-C"
    finally:
        finished.set()
        interrupter.join(5)
        with contextlib.suppress(OSError):
            os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))


def test_plumbum_local_runs_the_server_as_a_local_process() -> None:
    with rpycsvc.deploy([local], timeout=30) as cluster:
        assert cluster.addresses == ["local"]
        procs = server_pids(cluster)
        server = procs[0]
        assert server != os.getpid()
        assert cluster.submit(pids).result(timeout=30)[1] == server
        assert list(cluster.map(square, range(10), timeout=30)) == [x * x for x in range(10)]
        # python=None on plumbum.local: this very interpreter
        assert cluster[0].modules.sys.executable == sys.executable
    assert wait_gone(procs) == [], "the local server or a worker outlived the with block"


def test_a_wrong_host_type_names_what_deploy_accepts() -> None:
    for bad in (42, object(), ["host-a", 3.5], [Path("/tmp")]):
        with pytest.raises(TypeError, match=r"SshMachine, ParamikoMachine, or plumbum\.local"):
            rpycsvc.deploy(bad, timeout=5)
    with pytest.raises(ConfigError, match="at least one host"):
        rpycsvc.deploy([], timeout=5)


CRASHING_LOCAL_CLIENT = """\
import rpycsvc
from plumbum import local
cluster = rpycsvc.deploy([local], timeout=30)
stats = cluster[0].stats()
print("PIDS", stats["pid"], *stats["worker_pids"], flush=True)
input()  # until killed
"""


def test_a_crashed_client_leaves_no_local_server() -> None:
    # The local server is not tied to its parent by a signal (rpycsvc.deployment.machines): it must
    # stop on EOF from the dead client's pipe, workers included.
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_LOCAL_CLIENT],
        cwd=repo,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    found: list[str] = []
    try:
        assert proc.stdout is not None
        reader = threading.Thread(target=lambda: found.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert found and found[0].startswith("PIDS "), found
        procs = [int(p) for p in found[0].split()[1:]]
        assert len(procs) >= 2 and all(pid_alive(p) for p in procs)
        proc.kill()  # SIGKILL: no close(), no atexit, no finally
        proc.wait(10)
        assert wait_gone(procs) == [], "the local server or a worker outlived its client"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


# A client that deploys (HOSTS), prints its server's and workers' pids, and sleeps: a SIGINT
# to its process group must leave the server serving it (RESULT 4) until it closes.
_INTERRUPTED_CLIENT = """\
import sys, time
import rpycsvc
{imports}cluster = rpycsvc.deploy({hosts}, timeout=30)
stats = cluster[0].stats()
try:  # the test interrupts us once it has this line: print it inside the try
    print("PIDS", stats["pid"], *stats["worker_pids"], flush=True)
    time.sleep(120)  # the test interrupts us here
except KeyboardInterrupt:
    print("RESULT", cluster.submit(abs, -4).result(30), flush=True)  # the server still serves
cluster.close()
print("closed", flush=True)
"""
INTERRUPTED_LOCAL_CLIENT = _INTERRUPTED_CLIENT.format(
    imports="from plumbum import local\n", hosts="[local]")
INTERRUPTED_HOST_CLIENT = _INTERRUPTED_CLIENT.format(  # argv: ALIAS SSH_CONFIG
    imports="", hosts='[sys.argv[1]], ssh_options=["-F", sys.argv[2]]')


def interrupt_client(script: str, *args: str, server: str) -> None:
    """Run ``script`` in a process group of its own (as a terminal would give it), SIGINT
    the whole group once it printed its pids, as Ctrl-C or a Jupyter interrupt does; it must
    still get its result, close, and leave no server (named ``server``) or worker behind."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=repo,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # a few lines (deploy's); read with stdout at the end
        text=True,
        start_new_session=True,  # its own process group, as a terminal would give it
    )
    procs: list[int] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PIDS "), line
        procs = [int(p) for p in line.split()[1:]]
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=90)
        assert out.split() == ["RESULT", "4", "closed"], out + err
        assert proc.returncode == 0
        assert wait_gone(procs, 30) == [], f"close() left {server} or a worker running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in wait_gone(procs, 10):  # last resort: ours, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(180)
def test_ctrl_c_to_the_clients_process_group_leaves_its_plumbum_local_server_serving() -> None:
    # SIGINT to the client's whole process group, as a terminal's Ctrl-C or a Jupyter kernel
    # interrupt sends it: the client catches KeyboardInterrupt, and its server must not die.
    interrupt_client(INTERRUPTED_LOCAL_CLIENT, server="the local server")


@ssh
@pytest.mark.timeout(180)
def test_ctrl_c_to_the_clients_process_group_leaves_its_host_string_server_serving(
        sshd: SshServer) -> None:
    # deploy's ssh runs with BatchMode=yes (it never prompts), so it gets a session of its
    # own: SIGINT to the client's process group (Ctrl-C) must not end it and its server.
    own = sessions(sshd)
    interrupt_client(INTERRUPTED_HOST_CLIENT, sshd.alias, str(sshd.config_path),
                     server="the server")
    assert wait_sessions_within(sshd, own, 30) == set()


def test_only_a_batch_mode_ssh_gets_a_session_of_its_own() -> None:
    # ssh keeps the first value of an option: the caller's BatchMode=no (a prompt wanted)
    # beats deploy's BatchMode=yes, and then ssh must stay in our terminal's session.
    from rpycsvc.client.ssh import ssh_argv
    from rpycsvc.deployment.bootstrap import batch_mode

    assert batch_mode(ssh_argv("node1"))
    assert not batch_mode(ssh_argv("node1", ssh_options=["-o", "BatchMode=no"]))
    assert not batch_mode(ssh_argv("node1", ssh_options=["-oBatchMode no"]))
    assert not batch_mode(["ssh", "node1"])
