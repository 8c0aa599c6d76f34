"""A private sshd on 127.0.0.1 for ``rpycsvc bench --transports``: own keys, config and port.

It leaves /etc/ssh and ~/.ssh alone: host and client keys, ``sshd_config``, an
``authorized_keys``, a ``known_hosts`` and a client ``ssh_config`` live in a fresh temporary
directory, so ``ssh -F DIR/ssh_config ALIAS CMD`` logs in without prompts. Readiness is a
bounded wait for the ``SSH-2.0`` banner; :meth:`PrivateSshd.stop` ends the listener and the
per-connection processes it forked, then removes the directory.

The process helpers here (:func:`keygen`, :func:`free_port`, :func:`process_tree`,
:func:`terminate_tree`, ...) are shared with the test suite's fuller sshd
(``tests/support/sshd.py``, with network namespaces); they live in the package because the
bench ships with it.
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
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

SSHD = "/usr/sbin/sshd"
_S = TypeVar("_S", bound="PrivateSshd")


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


def keygen(path: Path, comment: str = "rpycsvc") -> Path:
    """A new passphrase-less ed25519 key at ``path`` (public half at ``path.pub``)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the caller must tolerate a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def banner(host: str, port: int) -> bool:
    """True if an sshd at ``host:port`` shows its ``SSH-2.0`` banner within a second."""
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(16).startswith(b"SSH-2.0")
    except OSError:
        return False


def proc_stat(pid: int) -> tuple[int, str, str] | None:
    """(ppid, state, start time) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # comm may hold spaces and parentheses
    return int(fields[1]), fields[0], fields[19]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone (it waits only to be reaped)."""
    stat = proc_stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def process_tree(root: int) -> list[tuple[int, str]]:
    """``root`` and all its descendants as (pid, start time), from one /proc walk."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
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


def terminate_tree(procs: Iterable[tuple[int, str]], timeout: float = 5.0) -> None:
    """TERM the given processes, KILL what is left after ``timeout``. The start time guards
    against signalling a recycled pid."""
    procs = list(procs)

    def alive() -> list[int]:
        out = []
        for pid, start in procs:
            st = proc_stat(pid)
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
    """``with PrivateSshd() as d: subprocess.run(d.ssh_argv() + ["true"])``.

    The test suite's sshd (``tests/support/sshd.py``) subclasses it: the hooks
    :meth:`_sshd_lines`, :meth:`_client_options`, :meth:`_sshd_argv` and :meth:`_wait_ready`
    are where it differs (network namespaces, sftp, a faster key exchange).
    """

    #: Names the temporary directory, the alias and the keys' comments.
    name = "rpycsvc-bench"
    #: Raised when sshd runs but shows no banner within ``start_timeout``.
    no_banner_error: type[Exception] = RuntimeError

    def __init__(self, start_timeout: float = 15.0, *, address: str = "127.0.0.1",
                 port: int = 0, alias: str | None = None) -> None:
        self.alias = alias or f"{self.name}-sshd-{os.getpid()}"
        self.address = address
        self.port = port
        self.start_timeout = start_timeout
        self.user = getpass.getuser()
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _path(self, name: str) -> Path:
        if self.dir is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self.dir / name

    @property
    def config(self) -> Path:
        """The client ``ssh_config`` that reaches this sshd as :attr:`alias`."""
        return self._path("ssh_config")

    def ssh_options(self) -> list[str]:
        """The ssh arguments that reach this sshd as :attr:`alias` (for ``deploy``)."""
        return ["-F", str(self.config)]

    def ssh_argv(self) -> list[str]:
        return ["ssh", *self.ssh_options(), self.alias]

    def log_text(self) -> str:
        """sshd's log so far ("" before start or after stop)."""
        try:
            return (self.dir / "sshd.log").read_text(errors="replace") if self.dir else ""
        except OSError:
            return ""

    def log_tail(self) -> str:
        return self.log_text()[-1500:]

    def start(self) -> PrivateSshd:
        """Keys, configs, sshd; returns once it shows its banner (RuntimeError otherwise)."""
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        self.dir = d = Path(tempfile.mkdtemp(prefix=f"{self.name}-sshd-"))
        try:
            if os.geteuid() == 0:
                os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            keygen(d / "host_key", f"{self.name}-host")
            keygen(d / "client_key", f"{self.name}-client")
            shutil.copy(d / "client_key.pub", d / "authorized_keys")
            kind, key = (d / "host_key.pub").read_text().split()[:2]
            (d / "known_hosts").write_text(f"{self.alias} {kind} {key}\n")
            bindir = d / "bin"  # offers this Python as python3.X, as a host would
            bindir.mkdir()
            (bindir / f"python{sys.version_info[0]}.{sys.version_info[1]}").symlink_to(
                os.path.realpath(sys.executable))
            fixed_port = self.port
            for _attempt in range(3):  # a free port can be taken before sshd binds it
                self.port = fixed_port or free_port(self.address)
                self._write_configs()
                if self._launch():
                    return self
                if fixed_port or "Address already in use" not in self.log_text():
                    break
            raise RuntimeError(f"sshd did not start: {self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _sshd_lines(self) -> list[str]:
        """The lines of ``sshd_config``."""
        d = self.dir
        return [f"ListenAddress {self.address}", f"Port {self.port}", f"HostKey {d}/host_key",
                f"AuthorizedKeysFile {d}/authorized_keys", f"PidFile {d}/sshd.pid",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "UsePAM no",
                "StrictModes no", "X11Forwarding no", "PrintMotd no",
                f"SetEnv PATH={d}/bin:/usr/local/bin:/usr/bin:/bin", "LogLevel INFO"]

    def _client_options(self, **overrides: str) -> dict[str, str]:
        """The client ``ssh_config`` options for :attr:`alias`, with ``overrides``."""
        d = self.dir
        return {
            "HostName": self.address, "Port": str(self.port), "User": self.user,
            "IdentityFile": str(d / "client_key") if d else "", "IdentitiesOnly": "yes",
            "HostKeyAlias": self.alias, "UserKnownHostsFile": f"{d}/known_hosts",
            "GlobalKnownHostsFile": "/dev/null", "StrictHostKeyChecking": "yes",
            "UpdateHostKeys": "no", "BatchMode": "yes", "ConnectTimeout": "10",
            "ControlMaster": "no", "ControlPath": "none", **overrides,
        }

    def _client_config(self, **overrides: str) -> str:
        body = "".join(f"    {k} {v}\n" for k, v in self._client_options(**overrides).items())
        return f"Host {self.alias}\n{body}"

    def _write_configs(self) -> None:
        self._path("sshd_config").write_text("".join(f"{ln}\n" for ln in self._sshd_lines()))
        self.config.write_text(self._client_config())

    def _sshd_argv(self) -> list[str]:
        return [SSHD, "-f", str(self._path("sshd_config")), "-D", "-e"]

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """True once sshd shows its banner; False if it exited or the time ran out."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if banner(self.address, self.port):
                return True
            time.sleep(0.02)
        return False

    def _launch(self) -> bool:
        """Start sshd; True once it answers, False if it exited (reason in the log)."""
        with open(self._path("sshd.log"), "wb") as log:
            self._proc = subprocess.Popen(
                self._sshd_argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        if self._wait_ready(self._proc):
            return True
        if self._proc.poll() is None:
            self._stop_process()
            raise self.no_banner_error(f"sshd gave no banner within {self.start_timeout:g} s: "
                               f"{self.log_tail()}")
        self._proc = None
        return False

    def _stop_process(self, timeout: float = 5.0) -> None:
        if self._proc is None:
            return
        terminate_tree(process_tree(self._proc.pid), timeout)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout)
        self._proc = None

    def stop(self) -> None:
        """Stop sshd and every session it forked; remove the directory."""
        try:
            self._stop_process()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
