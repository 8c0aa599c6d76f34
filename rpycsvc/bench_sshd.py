"""A private sshd on 127.0.0.1 for ``rpycsvc bench --transports``: own keys, config and port.

It leaves /etc/ssh and ~/.ssh alone: host and client keys, ``sshd_config``, an
``authorized_keys``, a ``known_hosts`` and a client ``ssh_config`` live in a fresh temporary
directory, so ``ssh -F DIR/ssh_config ALIAS CMD`` logs in without prompts. Readiness is a
bounded wait for the ``SSH-2.0`` banner; :meth:`PrivateSshd.stop` ends the listener and the
per-connection processes it forked, then removes the directory.

(The test suite has a fuller version with network namespaces, ``tests/support/sshd.py``;
this one is the part the bench needs, in the package because the bench ships with it.)
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def unavailable() -> str | None:
    """None if a private sshd can run here, else why not (said in the bench's note)."""
    if not os.path.exists(SSHD):
        return f"{SSHD} is not installed (apt-get install openssh-server)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (apt-get install openssh-client)"
    if not os.path.isdir("/proc"):
        return "no /proc to find sshd's per-connection processes at the end"
    if os.geteuid() != 0 and not os.path.isdir("/run/sshd"):
        return "/run/sshd is missing and we are not root to create it"
    return None


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(16).startswith(b"SSH-2.0")
    except OSError:
        return False


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(ppid, state, start time) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0], fields[19]


def _tree(root: int) -> list[tuple[int, str]]:
    """``root`` and its descendants as (pid, start time)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
                starts[int(entry)] = st[2]
    found: list[tuple[int, str]] = []
    todo = [root]
    while todo and len(found) < 10_000:
        pid = todo.pop()
        if pid in starts:
            found.append((pid, starts[pid]))
            todo.extend(children.get(pid, ()))
    return found


def _terminate(procs: list[tuple[int, str]], timeout: float = 5.0) -> None:
    """TERM, then KILL what is left; the start time guards against a recycled pid."""

    def alive() -> list[int]:
        out = []
        for pid, start in procs:
            st = _stat(pid)
            if st is not None and st[2] == start and st[1] not in ("Z", "X"):
                out.append(pid)
        return out

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while alive() and time.monotonic() < deadline:
            time.sleep(0.02)


class PrivateSshd:
    """``with PrivateSshd() as d: subprocess.run(d.ssh_argv() + ["true"])``."""

    def __init__(self, start_timeout: float = 15.0) -> None:
        self.alias = f"rpycsvc-bench-sshd-{os.getpid()}"
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        assert self.dir is not None, "PrivateSshd is not started"
        return self.dir / "ssh_config"

    def ssh_options(self) -> list[str]:
        """The ssh arguments that reach this sshd as :attr:`alias` (for ``deploy``)."""
        return ["-F", str(self.config)]

    def ssh_argv(self) -> list[str]:
        return ["ssh", *self.ssh_options(), self.alias]

    def log_tail(self) -> str:
        try:
            return (self.dir / "sshd.log").read_text(errors="replace")[-1500:] if self.dir else ""
        except OSError:
            return ""

    def start(self) -> PrivateSshd:
        """Keys, configs, sshd; returns once it shows its banner (RuntimeError otherwise)."""
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        self.dir = d = Path(tempfile.mkdtemp(prefix="rpycsvc-bench-sshd-"))
        try:
            if os.geteuid() == 0:
                os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            _keygen(d / "host_key", "rpycsvc-bench-host")
            _keygen(d / "client_key", "rpycsvc-bench-client")
            shutil.copy(d / "client_key.pub", d / "authorized_keys")
            kind, key = (d / "host_key.pub").read_text().split()[:2]
            (d / "known_hosts").write_text(f"{self.alias} {kind} {key}\n")
            bindir = d / "bin"  # offers this Python as python3.X, as a host would
            bindir.mkdir()
            (bindir / f"python{sys.version_info[0]}.{sys.version_info[1]}").symlink_to(
                os.path.realpath(sys.executable))
            for _attempt in range(3):  # a free port can be taken before sshd binds it
                self.port = _free_port()
                self._write_configs(bindir)
                if self._launch():
                    return self
                if "Address already in use" not in self.log_tail():
                    break
            raise RuntimeError(f"sshd did not start: {self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _write_configs(self, bindir: Path) -> None:
        d = self.dir
        assert d is not None
        (d / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {d}/host_key\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\n"
            "StrictModes no\nX11Forwarding no\nPrintMotd no\n"
            f"SetEnv PATH={bindir}:/usr/local/bin:/usr/bin:/bin\nLogLevel INFO\n")
        options = {
            "HostName": "127.0.0.1", "Port": str(self.port), "User": getpass.getuser(),
            "IdentityFile": str(d / "client_key"), "IdentitiesOnly": "yes",
            "HostKeyAlias": self.alias, "UserKnownHostsFile": str(d / "known_hosts"),
            "GlobalKnownHostsFile": "/dev/null", "StrictHostKeyChecking": "yes",
            "UpdateHostKeys": "no", "BatchMode": "yes", "ConnectTimeout": "10",
            "ControlMaster": "no", "ControlPath": "none",
        }
        body = "".join(f"    {k} {v}\n" for k, v in options.items())
        (d / "ssh_config").write_text(f"Host {self.alias}\n{body}")

    def _launch(self) -> bool:
        assert self.dir is not None
        with open(self.dir / "sshd.log", "wb") as log:
            self._proc = subprocess.Popen(
                [SSHD, "-f", str(self.dir / "sshd_config"), "-D", "-e"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and self._proc.poll() is None:
            if _banner(self.port):
                return True
            time.sleep(0.02)
        if self._proc.poll() is None:
            self._stop_process()
            raise RuntimeError(f"sshd gave no banner within {self.start_timeout:g} s: "
                               f"{self.log_tail()}")
        self._proc = None
        return False

    def _stop_process(self) -> None:
        if self._proc is None:
            return
        _terminate(_tree(self._proc.pid))
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None

    def stop(self) -> None:
        """Stop sshd and every session it forked; remove the directory."""
        try:
            self._stop_process()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def __enter__(self) -> PrivateSshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
