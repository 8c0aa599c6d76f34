"""More clients for a deployed server (rpycsvc.client.attach), against the suite's private sshd.

The "host" is this machine through ssh, so a test can look at the server's socket directory
and processes directly. A second client attaches with the address the deploying client
learnt (``cluster[0].server_info["attach"]``, ``ssh://alias/path``), through ``ssh -F
<the sshd's config>`` (``ssh_options=`` or ``RPYCSVC_SSH_OPTIONS``).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import rpycsvc
from rpycsvc.client.attach import split_address
from rpycsvc.errors import ConfigError, ConnectError
from rpycsvc.server.attach import peer_credentials, peer_is_owner
from tests.support.byvalue import tasks_by_value  # noqa: F401 (an autouse fixture)
from tests.support.sshd import SshServer, pid_alive

REPO = Path(__file__).resolve().parent.parent
WAIT = 60
pytestmark = [pytest.mark.ssh, pytest.mark.timeout(300)]



# -- tasks (run remotely) ----------------------------------------------------------------------
def slow_square(i: int) -> int:
    time.sleep(0.02)
    return i * i


def getpid() -> int:
    return os.getppid()  # the worker's parent: the server that ran it


# -- helpers -----------------------------------------------------------------------------------
def options(srv: SshServer) -> list[str]:
    return ["-F", str(srv.config_path)]


def deploy(srv: SshServer, **kw: Any) -> rpycsvc.Cluster:
    return rpycsvc.deploy([srv.alias], ssh_options=options(srv),
                          **{"timeout": 30, "output": "discard", **kw})


def socket_of(address: str) -> Path:
    """The socket path of an attach address (the host is this machine)."""
    return Path(split_address(address)[2])


def wait_until(check: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def attach_env(srv: SshServer) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), RPYCSVC_SSH_OPTIONS=f"-F {srv.config_path}")


# -- tests -------------------------------------------------------------------------------------
def test_a_second_client_attaches_while_the_first_runs_a_map(sshd: SshServer) -> None:
    cluster = deploy(sshd, workers=2)
    try:
        address = cluster[0].server_info["attach"]
        assert address.startswith(f"ssh://{sshd.alias}/") and address.endswith("/server.sock")
        sock = socket_of(address)
        assert stat.S_ISSOCK(sock.stat().st_mode)
        mode = sock.parent.stat()
        assert stat.S_IMODE(mode.st_mode) == 0o700 and mode.st_uid == os.getuid()
        assert os.listdir(sock.parent) == ["server.sock"]  # nothing else is written there

        results: list[Any] = []
        first = threading.Thread(
            target=lambda: results.append(list(cluster.map(slow_square, range(300)))))
        first.start()
        try:
            with rpycsvc.connect(address, ssh_options=options(sshd), output="discard",
                                 timeout=30) as second:
                assert second.address == address
                before = second.stats()
                assert before["pid"] == cluster[0].stats()["pid"]  # the same server
                assert second.compute(abs, -7) == 7
                futures = [second.submit(slow_square, i) for i in range(20)]
                assert [f.result(timeout=WAIT) for f in futures] == [i * i for i in range(20)]
                assert second.submit(getpid).result(timeout=WAIT) == before["pid"]
                after = second.stats()
                assert after["connections"] >= 2  # the deploying client and us
                grew = {k: after["tasks_by_transport"][k] - before["tasks_by_transport"][k]
                        for k in after["tasks_by_transport"]}
                assert grew["ssh"] >= 22 and grew["tcp"] == grew["tls"] == 0
                assert second.eval("1 + 1") == 2  # classic access too
        finally:
            first.join(WAIT)
        assert results == [[i * i for i in range(300)]]
        # the deploying client goes on after the second one left
        assert cluster.submit(abs, -3).result(timeout=WAIT) == 3
    finally:
        cluster.close()


def test_status_top_and_a_cluster_reach_the_server_by_its_attach_address(
        sshd: SshServer) -> None:
    cluster = deploy(sshd, workers=1)
    try:
        address = cluster[0].server_info["attach"]
        pid = cluster[0].stats()["pid"]
        cli = [sys.executable, "-m", "rpycsvc.cli"]
        done = subprocess.run([*cli, "status", address], capture_output=True, text=True,
                              timeout=WAIT, env=attach_env(sshd), stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        assert address in done.stdout and " up " in done.stdout, done.stdout
        assert "1 of 1 servers up" in done.stdout
        top = subprocess.run([*cli, "top", "--once", "-n", "0.1", address],
                             capture_output=True, text=True, timeout=WAIT,
                             env=attach_env(sshd), stdin=subprocess.DEVNULL)
        assert top.returncode == 0, top.stderr
        assert address in top.stdout, top.stdout
        # a Cluster of attach addresses (ssh options from the environment)
        os.environ["RPYCSVC_SSH_OPTIONS"] = f"-F {sshd.config_path}"
        try:
            with rpycsvc.Cluster([address], output="discard") as other:
                assert other.addresses == [address]
                assert other.submit(getpid).result(timeout=WAIT) == pid
        finally:
            del os.environ["RPYCSVC_SSH_OPTIONS"]
    finally:
        cluster.close()


def test_the_repl_attaches(sshd: SshServer) -> None:
    import io

    from rpycsvc.cli.repl import RemoteRepl

    cluster = deploy(sshd, workers=1)
    try:
        address = cluster[0].server_info["attach"]
        pid = cluster[0].stats()["pid"]
        out, err = io.StringIO(), io.StringIO()
        os.environ["RPYCSVC_SSH_OPTIONS"] = f"-F {sshd.config_path}"
        try:
            with RemoteRepl(address, stdout=out, stderr=err) as repl:
                assert repl.execute("import os; print(os.getppid())") == "ok"
        finally:
            del os.environ["RPYCSVC_SSH_OPTIONS"]
        # the REPL's session process is a child of the deployed server
        assert out.getvalue().split() == [str(pid)], (out.getvalue(), err.getvalue())
    finally:
        cluster.close()


def test_after_close_the_socket_is_gone_and_attaching_fails_clearly(sshd: SshServer) -> None:
    cluster = deploy(sshd, workers=1)
    try:
        address = cluster[0].server_info["attach"]
        second = rpycsvc.connect(address, ssh_options=options(sshd), output="discard")
        assert second.compute(abs, -2) == 2
    finally:
        cluster.close()
    sock = socket_of(address)
    assert wait_until(lambda: not sock.parent.exists()), f"{sock.parent} outlived close()"
    # the attached client learns that its server is gone
    assert wait_until(lambda: second.closed), "the attached client did not see its server go"
    second.close()
    with pytest.raises(ConnectError, match="no server listens there") as info:
        rpycsvc.connect(address, ssh_options=options(sshd), timeout=20)
    assert "No such file or directory" in str(info.value)


def test_bad_attach_addresses_are_config_errors() -> None:
    for bad in ("ssh://host-without-path", "ssh:///no/host", "unix://host/path", "ftp://x/y"):
        with pytest.raises(ConfigError, match="bad"):
            rpycsvc.connect(bad)


def test_attaching_with_a_wrong_key_says_ssh_failed(sshd: SshServer, tmp_path: Path) -> None:
    from tests.support.sshd import keygen

    stranger = keygen(tmp_path / "stranger")
    config = sshd.variant_config("stranger", IdentityFile=str(stranger))
    cluster = deploy(sshd, workers=1)
    try:
        address = cluster[0].server_info["attach"]
        with pytest.raises(ConnectError, match="ssh failed: ssh authentication failed"):
            rpycsvc.connect(address, ssh_options=["-F", str(config)], timeout=20)
    finally:
        cluster.close()


CRASHING_CLIENT = """\
import sys
import rpycsvc
cluster = rpycsvc.deploy([sys.argv[1]], ssh_options=["-F", sys.argv[2]], timeout=30, workers=1)
print("ATTACH", cluster[0].server_info["attach"], cluster[0].stats()["pid"], flush=True)
sys.stdin.read()  # until killed
"""


def test_a_crashed_deploying_client_removes_the_socket_and_ends_attached_clients(
        sshd: SshServer) -> None:
    argv = [sys.executable, "-c", CRASHING_CLIENT, sshd.alias, str(sshd.config_path)]
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ATTACH "), line
        _, address, server = line.split()
        second = rpycsvc.connect(address, ssh_options=options(sshd), output="discard")
        assert second.stats()["pid"] == int(server)
        proc.kill()  # SIGKILL: no close(), no atexit, no finally
        proc.wait(10)
        sock = socket_of(address)
        assert wait_until(lambda: not pid_alive(int(server))), "the server outlived its client"
        assert not sock.parent.exists(), f"{sock.parent} outlived the deploying client"
        assert wait_until(lambda: second.closed), "the attached client outlived the server"
        second.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def test_sigterm_to_the_server_removes_the_socket(sshd: SshServer) -> None:
    cluster = deploy(sshd, workers=1)
    try:
        address = cluster[0].server_info["attach"]
        pid = cluster[0].stats()["pid"]
        os.kill(pid, signal.SIGTERM)  # what PR_SET_PDEATHSIG sends when its sshd session ends
        assert wait_until(lambda: not pid_alive(pid)), "SIGTERM did not stop the server"
        assert not socket_of(address).parent.exists()
    finally:
        cluster.close()


def test_deploy_without_attach_opens_no_socket(sshd: SshServer) -> None:
    cluster = deploy(sshd, workers=1, attach=False)
    try:
        assert "attach" not in cluster[0].server_info
        pid = cluster[0].stats()["pid"]
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        inodes = {line.split()[6] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
                  if len(line.split()) > 7}
        # no listening Unix socket with a path among the server's descriptors
        assert not [fd for fd in fds if fd.startswith("socket:[") and fd[8:-1] in inodes
                    and _unix_path(fd[8:-1])], fds
    finally:
        cluster.close()


def _unix_path(inode: str) -> str:
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) > 7 and parts[6] == inode:
            return parts[7]
    return ""


# Run as another user: connect to the socket and say what happened within 5 s.
PROBE = """\
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT", type(e).__name__)
    sys.exit()
s.settimeout(5)
try:
    print("EOF" if s.recv(1) == b"" else "DATA")
except socket.timeout:
    print("OPEN")
except OSError as e:
    print("RESET", type(e).__name__)
"""
NOBODY = 65534


def probe(path: Path, user: int | None = None) -> str:
    python = "/usr/bin/python3" if user is not None else sys.executable
    done = subprocess.run([python, "-c", PROBE, str(path)], capture_output=True, text=True,
                          timeout=30, user=user, stdin=subprocess.DEVNULL, cwd="/")
    return done.stdout.strip() or done.stderr.strip()


@pytest.mark.skipif(os.getuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to run a probe as another uid, and /usr/bin/python3")
def test_another_uid_is_refused_by_the_directory_and_by_peercred(sshd: SshServer) -> None:
    cluster = deploy(sshd, workers=1)
    try:
        sock = socket_of(cluster[0].server_info["attach"])
        # our own uid gets in (the server then waits for the client to speak) ...
        assert probe(sock) == "OPEN"
        # ... another uid can't even reach the socket: the directory is 0700
        assert probe(sock, NOBODY) == "CONNECT PermissionError"
        # opened up (as a careless chmod would), the server still drops it: SO_PEERCRED
        os.chmod(sock.parent, 0o711)
        os.chmod(sock, 0o777)
        assert probe(sock, NOBODY) in ("EOF", "RESET ConnectionResetError")
        assert probe(sock) == "OPEN"
        assert cluster.submit(abs, -5).result(timeout=WAIT) == 5  # the server is unharmed
    finally:
        cluster.close()


def test_peer_credentials_of_a_real_socket_pair() -> None:
    import socket

    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())
        assert peer_is_owner(a)
    finally:
        a.close()
        b.close()


def _dead_socket_dir(base: Path, age: float) -> Path:
    """What a server killed with SIGKILL leaves: its 0700 directory with a socket nobody
    listens on, bound ``age`` seconds ago."""
    import socket
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="rpycsvc-", dir=base))
    path = directory / "server.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # never listened: connecting is refused, as to a dead server's socket
    then = time.time() - age
    os.utime(path, (then, then), follow_symlinks=False)
    return directory


def test_a_new_server_removes_what_killed_servers_left(sshd: SshServer) -> None:
    first = deploy(sshd, workers=1)
    try:
        live = socket_of(first[0].server_info["attach"])
        base = live.parent.parent  # where the servers of this host put their sockets
        dead = _dead_socket_dir(base, age=600)
        young = _dead_socket_dir(base, age=0)  # maybe a server binding right now: kept
        try:
            second = deploy(sshd, workers=1)
            second.close()
            assert not dead.exists(), "a dead server's socket directory was not removed"
            assert young.exists()
            assert live.exists()  # a live server's socket is never touched
            assert first.submit(abs, -1).result(timeout=WAIT) == 1
        finally:
            for leftover in (dead, young):
                if leftover.exists():
                    (leftover / "server.sock").unlink()
                    leftover.rmdir()
    finally:
        first.close()


def test_cli_deploy_prints_how_to_attach(sshd: SshServer) -> None:
    argv = [sys.executable, "-m", "rpycsvc.cli", "deploy", sshd.alias, "-F", str(sshd.config_path),
            "--workers", "1"]
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stderr is not None
        lines = []
        while not (lines and lines[-1].startswith("serving;")):
            line = proc.stderr.readline()
            assert line, lines
            lines.append(line)
        hint = [ln for ln in lines if ln.startswith(f"{sshd.alias}: attach with: ")]
        assert len(hint) == 1, lines
        command = hint[0].split(": attach with: ", 1)[1].strip()
        assert command.startswith("RPYCSVC_SSH_OPTIONS=") and " rpycsvc status ssh://" in command
        # the printed line works as printed (with this interpreter's rpycsvc)
        shell = command.replace(" rpycsvc status ",
                                f" {sys.executable} -m rpycsvc.cli status ", 1)
        done = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, timeout=WAIT,
                              env=dict(os.environ, PYTHONPATH=str(REPO)),
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0 and "1 of 1 servers up" in done.stdout, done
        sock = socket_of(command.rsplit(" ", 1)[1].strip("'"))
        assert sock.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert wait_until(lambda: not sock.parent.exists()), "the socket outlived the deploy"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_a_server_deployed_on_plumbum_local_is_attached_by_its_socket() -> None:
    plumbum = pytest.importorskip("plumbum")
    with rpycsvc.deploy([plumbum.local], timeout=30, workers=1, output="discard") as cluster:
        address = cluster[0].server_info["attach"]
        assert address.startswith("unix:///") and address.endswith("/server.sock")
        pid = cluster[0].stats()["pid"]
        with rpycsvc.connect(address, output="discard") as second:
            assert second.submit(getpid).result(timeout=WAIT) == pid
            assert second.stats()["tasks_by_transport"]["ssh"] >= 1
    assert wait_until(lambda: not socket_of(address).parent.exists())


def test_cli_deploy_no_attach(sshd: SshServer, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text("import rpycsvc\n"
                      "print(rpycsvc.Cluster.deployed()[0].server_info.get('attach'))\n")
    argv = [sys.executable, "-m", "rpycsvc.cli", "deploy", sshd.alias, "-F", str(sshd.config_path),
            "--workers", "1", "--no-attach", "--run", str(script)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=WAIT,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "None\n" and "attach with" not in done.stderr, done
