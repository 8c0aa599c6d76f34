"""rpycsvc.deploy and ``rpycsvc deploy`` against real private sshds, down to /proc.

The "remote" hosts are this machine through ssh (on 127.0.0.1, or inside network namespaces
the test creates), so a test can look for the remote server and its workers in /proc and
for leftovers in the remote user's /tmp and $HOME. Deploy times are printed, not asserted.
Network rule: connections run only on 127.0.0.0/8 or between namespaces made here; ssh to a
10.77 address always runs inside the client namespace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

import rpycsvc
from rpycsvc.errors import AllServersFailedError, ConfigError, DeployError, RpycsvcError
from tests.support.byvalue import tasks_by_value  # noqa: F401 (an autouse fixture)
from tests.support.leftovers import copies_of
from tests.support.netns import NetnsNetwork, netns_available
from tests.support.sshd import (
    SshServer,
    free_port,
    keygen,
    pid_alive,
    process_tree,
    sshd_available,
)

REPO = Path(__file__).resolve().parent.parent
ssh = pytest.mark.ssh



# -- tasks (run remotely) ----------------------------------------------------------------------
def pids() -> tuple[int, int]:
    return os.getpid(), os.getppid()


def chatty(n: int) -> int:
    for i in range(n):
        print(f"line {i} from pid {os.getpid()}")
    print("to stderr", file=sys.stderr)
    return n


def slow_echo(i: int) -> tuple[int, int]:
    time.sleep(0.005)
    return i, os.getppid()  # the worker's parent: the remote server of the host that ran it


# -- helpers -----------------------------------------------------------------------------------
def deploy(
    srv: SshServer, hosts: list[str] | None = None, config: Path | None = None, **kw: Any
) -> rpycsvc.Cluster:
    options = ["-F", str(config or srv.config_path)]
    return rpycsvc.deploy(hosts or [srv.alias], ssh_options=options, **{"timeout": 30, **kw})


def remote_pids(cluster: rpycsvc.Cluster, which: int | str = 0) -> list[int]:
    """The remote server of ``cluster[which]`` and every worker process it runs."""
    stats = cluster[which].stats()
    found = [stats["pid"], *stats["worker_pids"], stats.get("thread_worker_pid")]
    return [p for p in found if p]


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Poll until every pid has exited (bounded); return those still alive."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


def sessions(srv: SshServer) -> list[int]:
    """Processes under the sshd listener: per-connection sshds and what they run."""
    assert srv.pid is not None
    return [pid for pid, _ in process_tree(srv.pid) if pid != srv.pid and pid_alive(pid)]


def wait_no_sessions(srv: SshServer, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := sessions(srv)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def config_with(srv: SshServer, tmp_path: Path, **variants: dict[str, str]) -> Path:
    """The server's client config plus an alias per variant: the same host with some options
    replaced. One ``-F`` file serves every host of a deploy, so each bad host needs its own
    alias in it."""
    blocks = [srv.config_path.read_text()]
    for alias, overrides in variants.items():
        text = srv.variant_config(alias, **overrides).read_text()
        assert text.startswith(f"Host {srv.alias}\n")
        blocks.append(f"Host {alias}\n" + text.split("\n", 1)[1])
    path = tmp_path / "ssh_config"
    path.write_text("".join(blocks))
    return path


def _lines_until(stream: IO[str], needle: str, timeout: float) -> list[str]:
    """Lines of ``stream`` up to the one containing ``needle`` (bounded: a reader thread)."""
    lines: list[str] = []

    def read() -> None:
        for line in stream:
            lines.append(line)
            if needle in line:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return lines


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[measured] {text}")


# -- deploy, compute, classic, output ----------------------------------------------------------
@ssh
def test_deploy_compute_map_and_classic(
    sshd: SshServer, capsys: pytest.CaptureFixture[str]
) -> None:
    began = time.monotonic()
    cluster = deploy(sshd)
    took = time.monotonic() - began
    report(capsys, f"deploy to 1 host (127.0.0.1): {took:.2f} s")
    try:
        assert len(cluster) == 1 and cluster.unreachable == {}
        assert cluster.addresses == [sshd.alias]
        server_pid = cluster[0].stats()["pid"]
        assert server_pid not in (0, os.getpid())

        worker, parent = cluster.submit(pids).result(timeout=30)
        assert parent == server_pid and worker not in (server_pid, os.getpid())
        assert sum(cluster.map(abs, range(-5, 5), timeout=30)) == 25
        assert list(cluster.map(lambda x: x * x, range(6), timeout=30)) == [0, 1, 4, 9, 16, 25]

        # Classic access reaches the server process itself, over the same ssh session.
        assert cluster[0].modules.os.getpid() == server_pid
        assert cluster[0].eval("1 + 1") == 2
    finally:
        cluster.close()


@ssh
def test_remote_output_streams_with_the_host_prefix(
    sshd: SshServer, capfd: pytest.CaptureFixture[str]
) -> None:
    with deploy(sshd) as cluster:
        assert cluster.submit(chatty, 3).result(timeout=30) == 3
    out, err = capfd.readouterr()
    lines = [ln for ln in out.splitlines() if "from pid" in ln]
    assert len(lines) == 3 and all(ln.startswith(f"[{sshd.alias}] line ") for ln in lines), out
    assert f"[{sshd.alias}] to stderr" in err


@ssh
def test_capture_mode_keeps_output_on_the_future(
    sshd: SshServer, capfd: pytest.CaptureFixture[str]
) -> None:
    with deploy(sshd, output="capture") as cluster:
        fut = cluster.submit(chatty, 2)
        assert fut.result(timeout=30) == 2
        assert fut.stdout.count("from pid") == 2 and fut.stderr == "to stderr\n"
    with deploy(sshd) as cluster:  # per task, on a deployment that streams by default
        fut = cluster.options(output="capture").submit(chatty, 1)
        assert fut.result(timeout=30) == 1 and fut.stdout.startswith("line 0 from pid ")
    out, err = capfd.readouterr()
    assert "from pid" not in out and "to stderr" not in err


# -- teardown ----------------------------------------------------------------------------------
def _open_files(pid: int) -> list[str]:
    """Regular files (not memfds, pipes or sockets) the process has open."""
    found = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/") and not target.startswith(("/dev/", "/memfd:")):
                    found.append(target)
    return found


@ssh
def test_close_leaves_no_process_and_no_file(
    sshd: SshServer, capsys: pytest.CaptureFixture[str]
) -> None:
    home, tmp = Path.home(), Path("/tmp")
    home_before, tmp_before = set(os.listdir(home)), set(os.listdir(tmp))
    cluster = deploy(sshd)
    try:
        procs = remote_pids(cluster)
        assert procs[0] == cluster[0].stats()["pid"]
        assert len(procs) >= 3, procs  # the server, its process workers, the thread worker
        assert cluster.submit(pids).result(timeout=30)[1] == procs[0]
        # Nothing on disk while it runs either: the only "file" is the memfd bundle.
        assert [(p, f) for p in procs for f in _open_files(p)] == []
        # ... and the code it runs was imported from that memfd, not from some copy.
        where = cluster[0].eval("__import__('rpycsvc.deployment.host').deployment.__file__")
        assert where.startswith(f"/proc/{procs[0]}/fd/"), where
    finally:
        began = time.monotonic()
        cluster.close()
        took = time.monotonic() - began
    report(capsys, f"close() of a 1-host deployment: {took:.2f} s")
    assert wait_gone(procs) == [], "remote processes outlived close()"
    assert wait_no_sessions(sshd) == [], "an ssh session outlived close()"
    assert set(os.listdir(home)) - home_before == set()
    # Others may create files in /tmp meanwhile: only a copy of our code counts.
    # (b"def remote_main(rfile" is in rpycsvc/deployment/host.py's source)
    assert copies_of(tmp, tmp_before, b"def remote_main(rfile",
                     "rpycsvc/deployment/host.py") == []


@ssh
def test_killing_the_local_ssh_stops_the_remote_server(sshd: SshServer) -> None:
    cluster = deploy(sshd)
    try:
        procs = remote_pids(cluster)
        ssh_proc = cluster._owned[0].remote.proc
        os.kill(ssh_proc.pid, signal.SIGKILL)
        assert wait_gone(procs) == [], "the remote server or a worker outlived its ssh"
        assert wait_no_sessions(sshd) == []
        # The client side notices too: the cluster has no server left for a new task.
        with pytest.raises(RpycsvcError):
            cluster.submit(pids).result(timeout=30)
    finally:
        began = time.monotonic()
        cluster.close()
    assert time.monotonic() - began < 10


@ssh
@pytest.mark.timeout(120)
def test_a_classic_call_longer_than_the_keepalive_returns(sshd: SshServer) -> None:
    """A classic call runs in the deployed server's serving thread, which reads nothing from
    the ssh pipe meanwhile, so the client's keepalive pings wait there unread. The server's
    watchdog took that for a silent client and stopped the server after KEEPALIVE_TIMEOUT
    (the call and the next task failed with "connection closed by peer"; in CI, a 1 GiB
    argument handed to a worker kept the serving thread as busy)."""
    from rpycsvc.deployment.launcher import KEEPALIVE_TIMEOUT

    cluster = deploy(sshd, workers=1)
    try:
        c = cluster[0]
        before = remote_pids(cluster)[0]
        c.modules.time.sleep(KEEPALIVE_TIMEOUT + 4)
        assert c.compute(abs, -3) == 3 and c.lost is None
        assert remote_pids(cluster)[0] == before  # the same server, never restarted
    finally:
        cluster.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe sizes are Linux's")
@pytest.mark.timeout(120)
def test_a_client_gone_behind_a_full_pipe_stops_a_busy_stdio_server() -> None:
    """The stdio server (what deploy runs on the host; keepalive 3 s here) is busy in a
    classic call; its client fills the pipe to it and goes away. A full pipe counts as the
    client speaking only while the client's end is open: after it closed, the server stops
    within the keepalive. Before (review of the watchdog), it ran on as long as the call."""
    import rpyc

    from rpycsvc.client.opening import connect_stream
    from rpycsvc.protocol.pipes import FastPipeStream

    code = ("from rpycsvc.server.stdio import serve_stdio; from rpycsvc.server.config import "
            "ServerConfig; serve_stdio(ServerConfig(mode='stdio', keepalive=3.0, workers=1))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdin is not None and proc.stdout is not None
        c = connect_stream(FastPipeStream(proc.stdout, proc.stdin), address="stdio",
                           lost_after=None)
        rpyc.async_(c.modules.time.sleep)(300)  # its serving thread reads nothing meanwhile
        fd = proc.stdin.fileno()
        os.set_blocking(fd, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(fd, bytes(65536))
        proc.stdin.close()  # the client is gone, its pipe full
        assert proc.wait(60) == 3  # the watchdog's exit, within the keepalive (and load)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIONREAD on Linux")
@pytest.mark.timeout(120)
def test_a_stdio_server_on_a_socketpair_outlives_a_long_classic_call() -> None:
    """Some ssh servers give a session socketpairs, not pipes: the stdio server (keepalive
    3 s here) counts the pings waiting unread in its socket too, so an 8 s classic call
    returns. Before (review of the watchdog), only a pipe's could be counted: the server
    stopped mid-call, as it did on every transport before that."""
    import rpyc

    from rpycsvc.client.opening import connect_stream
    from rpycsvc.protocol.pipes import FastPipeStream

    code = ("from rpycsvc.server.stdio import serve_stdio; from rpycsvc.server.config import "
            "ServerConfig; serve_stdio(ServerConfig(mode='stdio', keepalive=3.0, workers=1))")
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=theirs.fileno(),
                            stdout=theirs.fileno(), stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    theirs.close()
    c = None
    try:
        c = connect_stream(FastPipeStream(os.fdopen(os.dup(ours.fileno()), "rb", buffering=0),
                                          os.fdopen(os.dup(ours.fileno()), "wb", buffering=0)),
                           address="stdio", lost_after=None)
        ping = rpyc.async_(c.conn.root.ping)
        stop = threading.Event()

        def pinger() -> None:  # as deploy's keepalive does
            while not stop.wait(1.0):
                with contextlib.suppress(Exception):
                    ping()
        threading.Thread(target=pinger, daemon=True).start()
        try:
            c.modules.time.sleep(8)
        finally:
            stop.set()
        assert proc.poll() is None and c.compute(abs, -4) == 4
    finally:
        if c is not None:
            c.close()
        ours.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


CRASHING_CLIENT = """\
import sys
import rpycsvc
cluster = rpycsvc.deploy([sys.argv[1]], ssh_options=["-F", sys.argv[2]], timeout=30)
stats = cluster[0].stats()
print("PIDS", cluster._owned[0].remote.pid, stats["pid"], *stats["worker_pids"], flush=True)
sys.stdin.read()  # until killed
"""


@ssh
def test_a_crashed_client_leaves_nothing_running(sshd: SshServer) -> None:
    argv = [sys.executable, "-c", CRASHING_CLIENT, sshd.alias, str(sshd.config_path)]
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = _lines_until(proc.stdout, "PIDS", timeout=30)
        assert lines and lines[-1].startswith("PIDS "), lines
        ssh_pid, *remote = map(int, lines[-1].split()[1:])
        proc.kill()  # SIGKILL: no close(), no atexit, no finally
        proc.wait(10)
        # ssh reads EOF from the dead client, the server reads EOF from ssh.
        assert wait_gone([ssh_pid, *remote]) == [], "ssh or the remote server outlived the client"
        assert wait_no_sessions(sshd) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


# -- errors ------------------------------------------------------------------------------------
@ssh
def test_bad_hosts_are_reported_beside_a_good_one(sshd: SshServer, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger")
    config = config_with(sshd, tmp_path, **{"wrong-key": {"IdentityFile": str(stranger)}})
    closed = f"{sshd.alias}:{free_port()}"  # host:port syntax; nobody listens there
    with deploy(sshd, [sshd.alias, closed, "wrong-key"], config) as cluster:
        assert cluster.addresses == [sshd.alias]
        assert set(cluster.unreachable) == {closed, "wrong-key"}
        refused, denied = cluster.unreachable[closed], cluster.unreachable["wrong-key"]
        assert isinstance(refused, DeployError) and refused.host == closed
        assert "connection refused" in str(refused) and closed in str(refused)
        assert isinstance(denied, DeployError) and denied.host == "wrong-key"
        assert "authentication failed" in str(denied) and "Permission denied" in str(denied)
        assert cluster.submit(pids).result(timeout=30)[1] == cluster[0].stats()["pid"]
    assert wait_no_sessions(sshd) == []


@ssh
def test_only_bad_hosts_is_all_servers_failed(sshd: SshServer, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger")
    config = config_with(
        sshd,
        tmp_path,
        **{
            "wrong-key": {"IdentityFile": str(stranger)},
            "unknown-host-key": {"UserKnownHostsFile": "/dev/null"},
        },
    )
    closed = f"127.0.0.1:{free_port()}"
    hosts = [closed, "wrong-key", "unknown-host-key"]
    began = time.monotonic()
    with pytest.raises(AllServersFailedError) as info:
        deploy(sshd, hosts, config)
    assert time.monotonic() - began < 20
    assert set(info.value.causes) == set(hosts)
    message = str(info.value)
    for cause in ("connection refused", "authentication failed", "host key verification failed"):
        assert cause in message, message
    assert wait_no_sessions(sshd) == []


@ssh
def test_missing_remote_python_is_named(sshd: SshServer) -> None:
    with pytest.raises(AllServersFailedError) as info:
        deploy(sshd, python="python3-does-not-exist")
    cause = info.value.causes[sshd.alias]
    assert isinstance(cause, DeployError)
    assert "python not found" in str(cause) and "python3-does-not-exist" in str(cause)


@ssh
def test_require_all_fails_and_stops_the_good_host(sshd: SshServer) -> None:
    closed = f"{sshd.alias}:{free_port()}"
    with pytest.raises(DeployError) as info:
        deploy(sshd, [sshd.alias, closed], require_all=True)
    message = str(info.value)
    assert closed in message and "connection refused" in message, message
    assert wait_no_sessions(sshd) == [], "the good host's server outlived the failed deploy"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _stop_our_ssh_to(srv: SshServer) -> list[int]:
    """Kill the ssh processes this test process started to ``srv`` (left behind by a bug);
    their remote servers then read EOF and exit. Returns their pids."""
    ours = [
        pid
        for pid, _ in process_tree(os.getpid())
        if pid != os.getpid() and _cmdline(pid).startswith("ssh ") and srv.alias in _cmdline(pid)
    ]
    for pid in ours:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return ours


@ssh
def test_a_bad_cluster_option_leaves_nothing_running(sshd: SshServer) -> None:
    try:
        with pytest.raises(RpycsvcError, match="retires"):
            deploy(sshd, retires=3)  # a typo for retries
        assert wait_no_sessions(sshd, timeout=5) == [], "a server outlived the failed deploy"
    finally:
        _stop_our_ssh_to(sshd)
        wait_no_sessions(sshd)


@ssh
def test_ctrl_c_during_deploy_leaves_nothing_running(sshd: SshServer, tmp_path: Path) -> None:
    # The remote start waits at a gate (a fifo) until we open it: Ctrl-C lands mid-deploy.
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    python = ["sh", "-c", f'read _ < {gate}; exec "$@"', "sh", "python3"]
    waiting, finished = threading.Event(), threading.Event()

    def interrupt_at_the_gate() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not finished.is_set():
            if any(f"read _ < {gate}" in _cmdline(p) for p in sessions(sshd)):
                waiting.set()
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: KeyboardInterrupt in our thread
                return
            time.sleep(0.02)

    interrupter = threading.Thread(target=interrupt_at_the_gate, daemon=True)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            deploy(sshd, python=python, timeout=25)
        assert waiting.is_set()
        # Let the remote start go on, as a slow host would after the user pressed Ctrl-C. The
        # shell may not have opened the fifo yet (ENXIO until it does), or may be gone already.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                if not any(f"read _ < {gate}" in _cmdline(p) for p in sessions(sshd)):
                    break  # nobody is left at the gate
                time.sleep(0.02)
                continue
            os.write(fd, b"go\n")
            os.close(fd)
            break
        assert wait_no_sessions(sshd, timeout=5) == [], "a server outlived the Ctrl-C"
    finally:
        finished.set()
        interrupter.join(5)
        with contextlib.suppress(OSError):  # nobody waits at the gate any more: ENXIO
            os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
        _stop_our_ssh_to(sshd)
        wait_no_sessions(sshd)


# -- the command line --------------------------------------------------------------------------
SCRIPT = """\
import sys
import rpycsvc
c = rpycsvc.Cluster.deployed()
print(sum(c.map(abs, range(-5, 5))))
stats = c[0].stats()
print(stats["pid"], *stats["worker_pids"], stats.get("thread_worker_pid") or "", file=sys.stderr)
"""


@ssh
def test_cli_deploy_runs_a_script(sshd: SshServer, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    argv = [
        sys.executable,
        "-m",
        "rpycsvc.cli.main",
        "deploy",
        sshd.alias,
        "-F",
        str(sshd.config_path),
        "--run",
        str(script),
    ]
    proc = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "25\n", proc.stdout + proc.stderr
    assert "deployed to 1 host(s) in " in proc.stderr
    pid_line = [ln for ln in proc.stderr.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    assert pid_line, proc.stderr
    procs = [int(p) for p in pid_line[-1].split()]
    assert len(procs) >= 2, procs
    assert wait_gone(procs) == [], "remote processes outlived 'rpycsvc deploy --run'"
    assert wait_no_sessions(sshd) == []


@ssh
def test_cli_deploy_to_an_unreachable_host_fails_clearly(sshd: SshServer) -> None:
    closed = f"{sshd.alias}:{free_port()}"
    argv = [
        sys.executable,
        "-m",
        "rpycsvc.cli.main",
        "deploy",
        closed,
        "-F",
        str(sshd.config_path),
        "--run",
        "/nonexistent-script.py",
    ]
    proc = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 2, proc.stderr
    assert "rpycsvc deploy: error:" in proc.stderr and "connection refused" in proc.stderr


@ssh
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_cli_deploy_serves_until_ctrl_c_or_sigterm(sshd: SshServer, how: str) -> None:
    argv = [sys.executable, "-m", "rpycsvc.cli", "deploy", sshd.alias, "-F", str(sshd.config_path)]
    # Its own session, so Ctrl-C can be sent like a terminal does: to the whole process
    # group, ssh included.
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        lines = _lines_until(proc.stderr, "serving;", timeout=30)
        assert lines and "serving; Ctrl-C" in lines[-1], lines
        remote = sessions(sshd)  # the session sshd, the server and its workers
        assert len(remote) >= 3, remote
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    assert wait_gone(remote) == [], f"remote processes outlived {how}"
    assert wait_no_sessions(sshd) == []


# -- several hosts in network namespaces -------------------------------------------------------
@ssh
@pytest.mark.netns
def test_three_hosts_map_survives_a_cut_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = sshd_available() or netns_available()
    if reason:
        pytest.skip(reason)
    net = NetnsNetwork(hosts=3)
    servers: list[SshServer] = []
    cluster: rpycsvc.Cluster | None = None
    try:
        net.start()
        for host in net.hosts:
            servers.append(SshServer(netns=host, address=net.address(host)))
            servers[-1].start()
        config = tmp_path / "ssh_config"  # one file naming all three (each its own key)
        config.write_text("".join(s.config_path.read_text() for s in servers))
        aliases = [s.alias for s in servers]

        began = time.monotonic()
        cluster = rpycsvc.deploy(
            aliases,
            ssh_command=[*net.exec_argv(net.client), "ssh"],
            ssh_options=["-F", str(config)],
            workers=2,
            timeout=30,
        )
        took = time.monotonic() - began
        report(capsys, f"deploy to 3 hosts (network namespaces, in parallel): {took:.2f} s")
        assert cluster.addresses == aliases and cluster.unreachable == {}
        server_of = {alias: cluster[alias].stats()["pid"] for alias in aliases}
        procs = {alias: remote_pids(cluster, alias) for alias in aliases}
        victim = aliases[1]
        victim_ns = net.hosts[1]

        n, cut_after = 300, 60
        results: list[tuple[int, int]] = []
        cut_at = None
        for item in cluster.map(slow_echo, range(n), chunksize=1, timeout=40):
            results.append(item)
            if len(results) == cut_after:
                net.cut(victim_ns)
                cut_at = time.monotonic()
        assert cut_at is not None
        after_cut = time.monotonic() - cut_at
        report(capsys, f"map of {n} tasks finished {after_cut:.2f} s after the cut")

        assert [i for i, _ in results] == list(range(n))  # each exactly once, in order
        ran_on = {parent for _, parent in results}
        assert ran_on <= set(server_of.values())
        assert server_of[victim] in {p for _, p in results[:cut_after]}  # it did take part
        others = {server_of[a] for a in aliases if a != victim}
        assert others <= {p for _, p in results[cut_after:]}  # the others finished the map
        assert after_cut < 30

        stats = cluster.stats()
        assert isinstance(stats[victim], BaseException)  # lost: ssh gave up on the link

        cluster.close()
        alive = [p for a in aliases if a != victim for p in procs[a]]
        assert wait_gone(alive) == [], "a remote server outlived close()"
        # The cut host's sshd learns that the session ended once its link is back.
        alive = [p for p in procs[victim] if pid_alive(p)]
        report(
            capsys,
            f"cut host, {time.monotonic() - cut_at:.1f} s after the cut and "
            f"before restore: {len(alive)} of {len(procs[victim])} processes still run",
        )
        net.restore(victim_ns)
        restored = time.monotonic()
        assert wait_gone(procs[victim], timeout=40) == [], "the cut host kept its server"
        report(capsys, f"cut host's server gone {time.monotonic() - restored:.2f} s after restore")
        for srv in servers:
            assert wait_no_sessions(srv, timeout=10) == [], srv.alias
    finally:
        if cluster is not None:
            cluster.close()
        for srv in servers:
            srv.stop()
        net.close()


@ssh
@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy-serving-thread"])
def test_a_host_whose_link_stays_dead_stops_its_server(tmp_path: Path, busy: bool) -> None:
    """``busy``: the server's serving thread is in a long classic call when the link dies, so
    the client's last pings lie unread in its pipe: unread bytes that stop growing are silence."""
    reason = sshd_available() or netns_available()
    if reason:
        pytest.skip(reason)
    net = NetnsNetwork(hosts=1)
    srv: SshServer | None = None
    cluster: rpycsvc.Cluster | None = None
    try:
        net.start()
        host = net.hosts[0]
        srv = SshServer(netns=host, address=net.address(host)).start()
        cluster = rpycsvc.deploy(
            [srv.alias],
            ssh_command=[*net.exec_argv(net.client), "ssh"],
            ssh_options=["-F", str(srv.config_path)],
            workers=1,
            timeout=30,
        )
        procs = remote_pids(cluster)
        if busy:
            import rpyc

            rpyc.async_(cluster[0].modules.time.sleep)(300)
        net.cut(host)
        # Our side gives up after ServerAliveInterval x ServerAliveCountMax (~6-8 s) ...
        cluster._owned[0].remote.proc.wait(20)
        # ... and the host's side should not take much longer to stop its server.
        assert wait_gone(procs, timeout=10) == [], "the server runs on behind a dead link"
    finally:
        if cluster is not None:
            cluster.close()
        if srv is not None:
            srv.stop()  # ends the session and the server under it, cut or not
        net.close()


# -- the ssh command line (no connection: ``ssh -G`` only evaluates it) -------------------------
@pytest.mark.parametrize(
    ("host", "tail"),
    [
        ("node1", ["node1"]),
        ("alice@node1:2222", ["-p", "2222", "alice@node1"]),
        ("[::1]:2200", ["-p", "2200", "::1"]),
        ("::1", ["::1"]),
    ],
)
def test_ssh_argv_parses_hosts(host: str, tail: list[str]) -> None:
    from rpycsvc.client.ssh import SSH_DEFAULTS, ssh_argv

    argv = ssh_argv(host, ("ip", "netns", "exec", "c", "ssh"), ["-F", "cfg"])
    assert argv[:5] == ["ip", "netns", "exec", "c", "ssh"]
    assert set(SSH_DEFAULTS) <= set(argv) and argv[-len(tail) :] == tail


def test_ssh_argv_refuses_a_bad_port() -> None:
    from rpycsvc.client.ssh import ssh_argv

    with pytest.raises(ConfigError, match="'node1:ssh'"):
        ssh_argv("node1:ssh")


def _effective_ssh_options(argv: list[str]) -> dict[str, str]:
    """What ssh would use for this command line: ``ssh -G`` evaluates it without connecting."""
    proc = subprocess.run(
        [argv[0], "-G", *argv[1:]],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(ln.split(" ", 1) for ln in proc.stdout.splitlines() if " " in ln)


def test_ssh_defaults_apply() -> None:
    from rpycsvc.client.ssh import ssh_argv

    if shutil.which("ssh") is None:
        pytest.skip("ssh is not installed")
    seen = _effective_ssh_options(
        ssh_argv("rpycsvc-no-such-alias", ssh_options=["-F", "/dev/null"])
    )
    assert seen["batchmode"] == "yes" and seen["serveraliveinterval"] == "2"
    assert seen["serveralivecountmax"] == "3" and seen["connecttimeout"] == "10"


def test_user_ssh_options_win_over_the_defaults() -> None:
    from rpycsvc.client.ssh import ssh_argv

    if shutil.which("ssh") is None:
        pytest.skip("ssh is not installed")
    mine = ["-F", "/dev/null", "-o", "ConnectTimeout=3", "-o", "ServerAliveInterval=15"]
    seen = _effective_ssh_options(ssh_argv("rpycsvc-no-such-alias", ssh_options=mine))
    assert (seen["connecttimeout"], seen["serveraliveinterval"]) == ("3", "15")


# -- deploy/: the files for a permanent installation (no ssh) ---------------------------------
DEPLOY_DIR = REPO / "deploy"


def _env_file(text: str) -> dict[str, str]:
    """systemd's EnvironmentFile= format as we use it: KEY=VALUE lines, '#' comments."""
    pairs = [ln.split("=", 1) for ln in text.splitlines() if ln.strip() and ln[0] != "#"]
    return {key.strip(): value.strip() for key, value in pairs}


def test_env_example_is_a_valid_and_safe_config() -> None:
    from rpycsvc.server.config import ServerConfig

    env = _env_file((DEPLOY_DIR / "rpycsvc.env.example").read_text())
    assert all(key.startswith("RPYCSVC_") for key in env)
    cfg = ServerConfig.from_env(env)
    assert (cfg.host, cfg.port, cfg.classic) == ("127.0.0.1", 18812, True)
    # Commented-out settings name real options too.
    commented = re.findall(
        r"^#(RPYCSVC_\w+)=", (DEPLOY_DIR / "rpycsvc.env.example").read_text(), re.MULTILINE
    )
    fields = {f"RPYCSVC_{f.upper()}" for f in ServerConfig.__dataclass_fields__}
    assert commented and set(commented) | set(env) <= fields
    # An administrator who only changes the address gets a refusal, not an open server.
    with pytest.raises(ConfigError, match="non-loopback"):
        ServerConfig.from_env({**env, "RPYCSVC_HOST": "0.0.0.0"})
    key = "k" * 32
    assert ServerConfig.from_env({**env, "RPYCSVC_HOST": "0.0.0.0", "RPYCSVC_AUTHKEY": key})


def test_hosts_example_parses() -> None:
    from rpycsvc.client.connect import parse_address
    from rpycsvc.client.discovery import read_hosts_file

    hosts = read_hosts_file(str(DEPLOY_DIR / "hosts.example"))
    assert [parse_address(h) for h in hosts] == [
        ("10.0.0.11", 18812),
        ("10.0.0.12", 18812),
        ("compute-3.example.org", 18900),
        ("2001:db8::13", 18812),
    ]


def test_systemd_unit() -> None:
    text = (DEPLOY_DIR / "rpycsvc.service").read_text()
    settings = dict(
        ln.split("=", 1) for ln in text.splitlines() if "=" in ln and not ln.startswith("#")
    )
    assert settings["ExecStart"].endswith("/rpycsvc serve")
    assert settings["EnvironmentFile"] == "/etc/rpycsvc/rpycsvc.env"
    assert settings["User"] == "rpycsvc" and settings["Restart"] == "on-failure"
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["KillMode"] == "mixed"  # SIGTERM to the server alone: it drains tasks
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    proc = subprocess.run(
        [analyze, "verify", str(DEPLOY_DIR / "rpycsvc.service")],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    # The only complaint allowed: this machine has no /opt/rpycsvc installation.
    problems = [
        ln
        for ln in (proc.stdout + proc.stderr).splitlines()
        if ln.strip() and "/opt/rpycsvc/bin/rpycsvc is not executable" not in ln
    ]
    assert problems == []
