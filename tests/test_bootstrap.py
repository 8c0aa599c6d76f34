"""rpycsvc.deployment.bootstrap against a real private sshd: channel, no files on disk,
teardown, errors.

The "remote" is this machine through ssh, so the tests can look at the remote process in
/proc and at the remote user's files directly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from io import BytesIO
from pathlib import Path

import pytest

from rpycsvc.deployment.bootstrap import start_remote
from rpycsvc.deployment.bundle import build_bundle
from rpycsvc.deployment.loader import EXIT_FRAMING, EXIT_IMPORT, EXIT_TOO_OLD, remote_command
from rpycsvc.deployment.remote_entry import RemoteProcess
from rpycsvc.errors import ConfigError, DeployError
from tests.support.echo_entry import CMD_PREFIX, MARKER, exchange, write_frame
from tests.support.leftovers import copies_of
from tests.support.sshd import (
    SshServer,
    free_port,
    keygen,
    pid_alive,
    process_tree,
    sshd_available,
)

ENTRY = "tests.support.echo_entry:main"
PACKAGES = ["tests.support.echo_entry"]
ssh = pytest.mark.ssh


def start(srv: SshServer, **kw: object) -> RemoteProcess:
    return start_remote(srv.ssh_argv(), ENTRY, PACKAGES, **{"timeout": 30.0, **kw})  # type: ignore[arg-type]


def call(remote: RemoteProcess, payload: bytes | None, timeout: float = 30.0) -> bytes:
    """Send one frame (None: just read), return the answer; a hung remote fails the test."""
    try:
        return exchange(remote.stdin, remote.stdout, payload, timeout)
    except (TimeoutError, EOFError) as exc:
        remote.close(0)
        raise AssertionError(f"{exc}; remote stderr: {remote.stderr_text()}") from None


def first_frame(remote: RemoteProcess) -> int:
    """The echo entry's greeting: its pid."""
    return int(call(remote, None))


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not pid_alive(pid)


# -- the channel ------------------------------------------------------------------------------
@ssh
def test_echo_both_ways_and_clean_close(sshd: SshServer) -> None:
    remote = start(sshd)
    try:
        assert first_frame(remote) == remote.remote_pid > 0
        assert remote.python_version.startswith("3.")
        for payload in (b"hello", b"", b"\n\x00RPYCSVC-READY \xff" * 3):
            assert call(remote, payload) == payload
    finally:
        code = remote.close(10)
    assert code == 0, remote.stderr_text()


@ssh
def test_large_frame_round_trips(sshd: SshServer) -> None:
    payload = os.urandom(8 << 20)
    with start(sshd) as remote:
        first_frame(remote)
        assert call(remote, payload, timeout=60) == payload


@ssh
def test_stray_output_goes_to_stderr_not_the_channel(sshd: SshServer) -> None:
    with start(sshd) as remote:
        first_frame(remote)
        assert call(remote, CMD_PREFIX + b"stray-output") == b"done"
        assert call(remote, b"still in sync") == b"still in sync"
    err = remote.stderr_text()
    assert "stray print" in err and "stray write to fd 1" in err and "stray child output" in err


@ssh
def test_child_interpreter_imports_the_bundle(sshd: SshServer) -> None:
    with start(sshd) as remote:
        first_frame(remote)
        assert call(remote, CMD_PREFIX + b"child-import").decode() == MARKER


@ssh
def test_memory_importer_fallback(sshd: SshServer) -> None:
    with start(sshd, memfd=False) as remote:
        first_frame(remote)
        info = call(remote, CMD_PREFIX + b"info").decode()
        assert "<rpycsvc-bundle>/tests/support/echo_entry.py" in info
        assert "memfd" not in info
        assert call(remote, b"x" * 100_000) == b"x" * 100_000


@ssh
def test_interpreter_path_with_space_and_quote(sshd: SshServer) -> None:
    assert sshd.dir is not None
    odd = sshd.dir / "it's a dir"
    odd.mkdir()
    link = odd / "py 3"
    link.symlink_to(shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3")
    with start(sshd, python=str(link)) as remote:
        assert remote.python_executable == str(link)
        first_frame(remote)
        assert call(remote, b"'\"$HOME `x` !") == b"'\"$HOME `x` !"


# -- nothing on disk --------------------------------------------------------------------------
def _entries(directory: Path) -> set[str]:
    return set(os.listdir(directory))


@ssh
def test_no_new_files_in_tmp_or_home(sshd: SshServer) -> None:
    home, tmp = Path.home(), Path("/tmp")
    home_before, tmp_before = _entries(home), _entries(tmp)
    with start(sshd) as remote:
        first_frame(remote)
        assert call(remote, b"ping") == b"ping"
    assert _entries(home) - home_before == set()
    # Other work on this machine may create files in /tmp: only a copy of the bundle counts.
    assert copies_of(tmp, tmp_before, MARKER.encode(), "tests/support/echo_entry.py") == []


_WRITE_CALL = re.compile(r"^\d+\s+(?P<call>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)", re.MULTILINE)
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")
_WRITE_CALLS = set(
    "creat mkdir mkdirat rename renameat renameat2 link linkat symlink symlinkat unlink "
    "unlinkat truncate".split()
)


def _writes_a_file(m: re.Match[str]) -> bool:
    """A successful syscall that creates, changes or removes a file (or opens one to write)."""
    if int(m.group("ret")) < 0:
        return False
    if m.group("call").startswith("open"):
        return any(flag in m.group("args") for flag in _WRITE_FLAGS)
    return m.group("call") in _WRITE_CALLS


@ssh
def test_remote_process_writes_no_file_strace(sshd: SshServer) -> None:
    """Every successful file-creating syscall of the remote Python, seen by strace: none."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    if (
        subprocess.run(
            [strace, "-o", "/dev/null", "true"], capture_output=True, timeout=30
        ).returncode
        != 0
    ):
        pytest.skip("strace can't trace here (ptrace not permitted)")
    assert sshd.dir is not None
    log = sshd.dir / "strace.log"
    syscalls = "trace=%file,memfd_create"
    with start(sshd, python=[strace, "-f", "-qq", "-e", syscalls, "-o", str(log), "python3"]) as r:
        first_frame(r)
        assert call(r, b"ping") == b"ping"
    text = log.read_text()
    written = [m.group(0) for m in _WRITE_CALL.finditer(text) if _writes_a_file(m)]
    assert written == []
    assert re.search(r'memfd_create\("rpycsvc-bundle", MFD_CLOEXEC\) = \d+', text)


# -- teardown ---------------------------------------------------------------------------------
@ssh
def test_close_stops_the_remote_python(sshd: SshServer) -> None:
    remote = start(sshd)
    pid = first_frame(remote)
    assert pid_alive(pid)
    assert remote.close(10) == 0
    assert wait_gone(pid), f"remote python {pid} outlived close()"


@ssh
def test_killing_local_ssh_stops_the_remote_python(sshd: SshServer) -> None:
    remote = start(sshd)
    try:
        pid = first_frame(remote)
        os.kill(remote.pid, signal.SIGKILL)
        assert wait_gone(pid), f"remote python {pid} outlived its ssh connection"
    finally:
        remote.close(5)


@ssh
def test_stuck_entry_dies_with_its_ssh_session(sshd: SshServer) -> None:
    remote = start(sshd)
    pid = first_frame(remote)
    write_frame(remote.stdin, CMD_PREFIX + b"hang")
    began = time.monotonic()
    remote.close(1.0)  # EOF is not read by the stuck entry: close() kills ssh after 1 s
    assert time.monotonic() - began < 8
    assert wait_gone(pid), f"stuck remote python {pid} outlived its ssh session"


# -- errors -----------------------------------------------------------------------------------
def _deploy_error(srv: SshServer, argv: list[str] | None = None, **kw: object) -> str:
    with pytest.raises(DeployError) as info:
        start_remote(argv or srv.ssh_argv(), ENTRY, PACKAGES, **{"timeout": 30.0, **kw})  # type: ignore[arg-type]
    message = str(info.value)
    assert srv.alias in message, message
    assert info.value.host == srv.alias
    return message


@ssh
def test_wrong_key_is_an_authentication_error(sshd: SshServer, tmp_path: Path) -> None:
    config = sshd.variant_config("wrong-key", IdentityFile=str(keygen(tmp_path / "stranger")))
    message = _deploy_error(sshd, sshd.ssh_argv(config=config))
    assert "authentication failed" in message and "Permission denied" in message


@ssh
def test_closed_port_is_connection_refused(sshd: SshServer) -> None:
    message = _deploy_error(sshd, sshd.ssh_argv(options={"Port": str(free_port())}))
    assert "connection refused" in message


@ssh
def test_unknown_host_key_is_refused(sshd: SshServer) -> None:
    argv = sshd.ssh_argv(options={"UserKnownHostsFile": "/dev/null"})
    assert "host key verification failed" in _deploy_error(sshd, argv)


@ssh
def test_missing_python(sshd: SshServer) -> None:
    message = _deploy_error(sshd, python="python2.7-does-not-exist")
    assert "python not found" in message and "python2.7-does-not-exist" in message


@ssh
def test_python_too_old(sshd: SshServer) -> None:
    message = _deploy_error(sshd, min_version=(99, 0))
    assert "too old" in message and ">= 99.0" in message


@ssh
def test_entry_import_failure_shows_remote_traceback(sshd: SshServer) -> None:
    with pytest.raises(DeployError) as info:
        start_remote(sshd.ssh_argv(), "no_such_module:main", PACKAGES, timeout=30)
    message = str(info.value)
    assert "failed to import" in message and "ModuleNotFoundError" in message


@ssh
def test_no_handshake_in_time_is_bounded(sshd: SshServer) -> None:
    began = time.monotonic()
    message = _deploy_error(sshd, python=["sh", "-c", "cat >/dev/null", "sh"], timeout=1.0)
    assert "no ready handshake within 1.0 s" in message
    assert time.monotonic() - began < 6


def _has_sleep(tree: list[tuple[int, str]]) -> bool:
    comms = []
    for pid, _ in tree:
        with contextlib.suppress(OSError):
            comms.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return "sleep" in comms


@ssh
def test_sshd_stop_ends_open_sessions_too() -> None:
    reason = sshd_available()
    if reason:
        pytest.skip(reason)
    with SshServer() as srv:
        assert srv.pid is not None
        client = subprocess.Popen([*srv.ssh_argv(), "exec sleep 60"], stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not _has_sleep(tree := process_tree(srv.pid)) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _has_sleep(tree), tree  # listener -> per-connection sshd(s) -> sleep
        finally:
            srv.stop()
            try:
                code = client.wait(20)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait(5)
                raise
    assert code != 0  # the session ended under the client
    assert not [pid for pid, _ in tree if pid_alive(pid)]


# -- the bundle and the command line (no ssh) -------------------------------------------------
def test_bundle_is_deterministic_cached_and_clean() -> None:
    first = build_bundle(["rpycsvc", *PACKAGES])
    assert build_bundle(["rpycsvc", *PACKAGES]) is first
    with zipfile.ZipFile(BytesIO(first)) as zf:
        names = zf.namelist()
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert names == sorted(names)
    assert {
        "tests/__init__.py",
        "tests/support/__init__.py",
        "tests/support/echo_entry.py",
        "rpycsvc/deployment/bootstrap.py",
    } <= set(names)
    assert not [n for n in names if "__pycache__" in n]
    # byte code rides along as unchecked hash-based .pyc beside its .py (PEP 552)
    pycs = [n for n in names if n.endswith(".pyc")]
    assert pycs and all(n[:-1] in names for n in pycs)
    with zipfile.ZipFile(BytesIO(first)) as zf:
        head = zf.read("rpycsvc/deployment/bootstrap.pyc")[:8]
    assert head[:4] == importlib.util.MAGIC_NUMBER and head[4:8] == (1).to_bytes(4, "little")
    assert "tests/support/sshd.py" not in names


@pytest.mark.parametrize("name", ["no_such_module_xyz", "sys", "_socket"])
def test_bundle_refuses_what_cannot_be_imported_from_memory(name: str) -> None:
    with pytest.raises(ConfigError, match=repr(name)):
        build_bundle([name])


def test_remote_command_is_one_shell_word_safe_line() -> None:
    cmd = remote_command(["/opt/my python/bin/python3"], min_version=(3, 9))
    assert "\n" not in cmd and cmd.startswith("exec '/opt/my python/bin/python3' -c '")
    proc = subprocess.run(
        ["sh", "-c", remote_command("python3-does-not-exist")], capture_output=True, timeout=30
    )
    assert proc.returncode == 127


def _run_loader_locally(stdin: bytes, **kw: object) -> subprocess.CompletedProcess[bytes]:
    """The exact remote command, run by a local shell: the loader's protocol without ssh."""
    cmd = remote_command(sys.executable, **kw)  # type: ignore[arg-type]
    return subprocess.run(["sh", "-c", cmd], input=stdin, capture_output=True, timeout=60)


def _frame(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def test_loader_protocol_without_ssh() -> None:
    stdin = _frame(build_bundle(PACKAGES)) + _frame(ENTRY.encode()) + _frame(b"abc")
    proc = _run_loader_locally(stdin)
    assert proc.returncode == 0, proc.stderr
    ready, rest = proc.stdout.split(b"\n", 1)
    version, pid, exe = ready.decode().split(" ", 3)[1:]
    assert version == ".".join(map(str, sys.version_info[:3])) and exe == sys.executable
    assert rest == _frame(pid.encode()) + _frame(b"abc")


def test_loader_exit_codes_without_ssh() -> None:
    truncated = _run_loader_locally(_frame(b"x" * 10)[:12])
    assert truncated.returncode == EXIT_FRAMING and b"before the bundle arrived" in truncated.stderr
    old = _run_loader_locally(b"", min_version=(99, 1))
    assert old.returncode == EXIT_TOO_OLD and b"too old, need >= 99.1" in old.stderr
    bad = _run_loader_locally(
        _frame(build_bundle(PACKAGES)) + _frame(b"tests.support.echo_entry:x")
    )
    assert bad.returncode == EXIT_IMPORT and b"AttributeError" in bad.stderr
