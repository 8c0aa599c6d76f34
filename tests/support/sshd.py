"""A private, real sshd for tests: own keys, config and port; leaves /etc/ssh alone.

``SshServer`` listens on 127.0.0.1 (or on an address inside a network namespace we made) and
writes a client ``ssh_config`` so that ``ssh -F cfg ALIAS`` just works, without prompts or
touching ~/.ssh. Readiness is a bounded wait for the ``SSH-2.0`` banner; ``stop()`` ends the
listener and every per-connection child it forked (they outlive the listener otherwise).
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
from collections.abc import Iterable, Mapping
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"

# Run inside a namespace (we may not connect there from the root namespace): wait for the
# banner at ADDR PORT until DEADLINE_SECONDS pass; exit 0 once seen.
_PROBE = """
import socket, sys, time
host, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.settimeout(1)
            if s.recv(16).startswith(b"SSH-2.0"):
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.02)
sys.exit(1)
"""


def sshd_available() -> str | None:
    """None if a private sshd can run here, else why not (a pytest skip reason)."""
    if not os.path.exists(SSHD):
        return f"{SSHD} is missing: apt-get install openssh-server"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH: apt-get install openssh-client"
    if os.geteuid() != 0 and not os.path.isdir("/run/sshd"):
        return "/run/sshd is missing and we are not root to create it"
    return None


def keygen(path: Path, comment: str = "rpycsvc-test") -> Path:
    """A new passphrase-less ed25519 key at ``path`` (public half at ``path.pub``)."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the caller must tolerate a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _proc_stat(pid: int) -> tuple[int, str, str] | None:
    """(ppid, state, start time) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # comm may hold spaces and parentheses
    return int(fields[1]), fields[0], fields[19]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone (it waits only to be reaped)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def process_tree(root: int) -> list[tuple[int, str]]:
    """``root`` and all its descendants as (pid, start time), from one /proc walk."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            children.setdefault(stat[0], []).append(int(entry))
            starts[int(entry)] = stat[2]
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

    def alive() -> list[int]:
        return [
            pid
            for pid, start in procs
            if (stat := _proc_stat(pid)) is not None and stat[2] == start and pid_alive(pid)
        ]

    procs = list(procs)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while alive() and time.monotonic() < deadline:
            time.sleep(0.02)


class SshServer:
    """A private sshd. ``with SshServer() as srv: subprocess.run(srv.ssh_argv() + ["true"])``.

    With ``netns``, sshd runs via ``ip netns exec NETNS`` and listens on ``address`` there
    (port 22 unless given); clients must then run in a namespace too: ``ssh_argv(netns=...)``.
    """

    def __init__(
        self,
        *,
        netns: str | None = None,
        address: str = "127.0.0.1",
        port: int | None = None,
        alias: str | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        self.netns = netns
        self.address = address
        self.port = port or 0
        self.alias = alias or f"rpycsvc-sshd-{os.getpid()}-{id(self) & 0xFFFF:x}"
        self.start_timeout = start_timeout
        self.user = getpass.getuser()
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # Paths inside our directory; valid after start().
    @property
    def config_path(self) -> Path:
        return self._path("ssh_config")

    @property
    def key_path(self) -> Path:
        return self._path("client_key")

    @property
    def log_path(self) -> Path:
        return self._path("sshd.log")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _path(self, name: str) -> Path:
        if self.dir is None:
            raise RuntimeError("SshServer is not started")
        return self.dir / name

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def ssh_argv(
        self,
        alias: str | None = None,
        *,
        options: Mapping[str, str] | None = None,
        netns: str | None = None,
        config: Path | None = None,
    ) -> list[str]:
        """``["ssh", "-F", cfg, (-o K=V)..., alias]``, prefixed by ``ip netns exec NETNS``.

        ``-o`` options win over the config file (e.g. ``{"Port": "1"}``).
        """
        argv = ["ssh", "-F", str(config or self.config_path)]
        for key, value in (options or {}).items():
            argv += ["-o", f"{key}={value}"]
        argv.append(alias or self.alias)
        return (["ip", "netns", "exec", netns] if netns else []) + argv

    def start(self) -> SshServer:
        """Create keys and configs, start sshd, return once it shows its banner."""
        reason = sshd_available()
        if reason:
            raise RuntimeError(reason)
        self.dir = Path(tempfile.mkdtemp(prefix="rpycsvc-sshd-"))
        try:
            subprocess.run(["install", "-d", "-m", "0755", "/run/sshd"], check=True, timeout=10)
            keygen(self.dir / "host_key", "rpycsvc-test-host")
            keygen(self.key_path, "rpycsvc-test-client")
            shutil.copy(self.key_path.with_suffix(".pub"), self.dir / "authorized_keys")
            host_pub = (self.dir / "host_key.pub").read_text().split()
            (self.dir / "known_hosts").write_text(f"{self.alias} {host_pub[0]} {host_pub[1]}\n")
            fixed_port = self.port or (22 if self.netns else 0)
            for _attempt in range(3):  # a free port can be taken before sshd binds it
                self.port = fixed_port or free_port(self.address)
                self._write_configs()
                if self._launch():
                    return self
                if fixed_port or "Address already in use" not in self.log_text():
                    break
            raise RuntimeError(f"sshd did not start: {self.log_text()[-2000:]}")
        except BaseException:
            self.stop()
            raise

    def _write_configs(self) -> None:
        d = self.dir
        assert d is not None
        (d / "sshd_config").write_text(
            f"""\
ListenAddress {self.address}
Port {self.port}
HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PidFile {d}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
Subsystem sftp {SFTP_SERVER}
SetEnv SHLVL=1 PATH={self._host_path()}
LogLevel INFO
"""
        )
        self.config_path.write_text(self._client_config())

    def _host_path(self) -> str:
        """The ssh sessions' PATH: the system's, after a directory that offers the Python
        running the tests as ``python3.X``, as a host with that version installed would (so
        ``deploy`` finds the client's version there on every interpreter of the matrix)."""
        assert self.dir is not None
        bindir = self.dir / "bin"
        bindir.mkdir(exist_ok=True)
        link = bindir / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        if not link.exists():
            link.symlink_to(os.path.realpath(sys.executable))
        return f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    def _client_config(self, **overrides: str) -> str:
        d = self.dir
        options = {
            "HostName": self.address,
            "Port": str(self.port),
            "User": self.user,
            "IdentityFile": str(self.key_path),
            "IdentitiesOnly": "yes",
            "HostKeyAlias": self.alias,
            "UserKnownHostsFile": f"{d}/known_hosts",
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "UpdateHostKeys": "no",
            "BatchMode": "yes",
            "ConnectTimeout": "5",
            "KexAlgorithms": "curve25519-sha256",  # the post-quantum default costs ~165 ms
            "ControlMaster": "no",
            "ControlPath": "none",
            **overrides,
        }
        body = "".join(f"    {key} {value}\n" for key, value in options.items())
        return f"Host {self.alias}\n{body}"

    def variant_config(self, name: str, **overrides: str) -> Path:
        """Another client config for the same alias with some options replaced, e.g.
        ``IdentityFile=other_key`` (cumulative options can't be replaced with ``-o``)."""
        path = self._path(f"ssh_config-{name}")
        path.write_text(self._client_config(**overrides))
        return path

    def _launch(self) -> bool:
        """Start sshd; True once it answers, False if it exited (reason in the log)."""
        assert self.dir is not None
        argv = [SSHD, "-f", str(self.dir / "sshd_config"), "-D", "-e"]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout
        if self.netns:
            probe_args = [sys.executable, "-c", _PROBE, self.address, str(self.port)]
            probe = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *probe_args, str(self.start_timeout)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                ok = probe.wait(self.start_timeout + 10) == 0
            except subprocess.TimeoutExpired:
                probe.kill()
                probe.wait(5)
                ok = False
            if ok:
                return True
        else:
            while time.monotonic() < deadline and self._proc.poll() is None:
                if _banner(self.address, self.port):
                    return True
                time.sleep(0.02)
        if self._proc.poll() is None:
            self._stop_process()
            raise TimeoutError(f"sshd gave no banner in {self.start_timeout} s: {self.log_text()}")
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
        """Stop sshd and its per-connection children, remove our directory."""
        try:
            self._stop_process()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def __enter__(self) -> SshServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _banner(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(16).startswith(b"SSH-2.0")
    except OSError:
        return False
