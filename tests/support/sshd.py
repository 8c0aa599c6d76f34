"""A private, real sshd for tests: own keys, config and port; leaves /etc/ssh alone.

``SshServer`` listens on 127.0.0.1 (or on an address inside a network namespace we made) and
writes a client ``ssh_config`` so that ``ssh -F cfg ALIAS`` just works, without prompts or
touching ~/.ssh. Readiness is a bounded wait for the ``SSH-2.0`` banner; ``stop()`` ends the
listener and every per-connection child it forked (they outlive the listener otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

# The keys, ports and process handling are the bench's (the package ships it); the tests
# import them from here, with the sshd itself.
from rpycsvc.cli.bench.sshd import (
    SSHD,
    PrivateSshd,
    free_port,
    keygen,
    pid_alive,
    process_tree,
    terminate_tree,
)
from rpycsvc.cli.bench.sshd import unavailable as sshd_available

__all__ = ["SSHD", "SshServer", "free_port", "keygen", "pid_alive", "process_tree",
           "sshd_available", "terminate_tree"]

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


class SshServer(PrivateSshd):
    """A private sshd. ``with SshServer() as srv: subprocess.run(srv.ssh_argv() + ["true"])``.

    The bench's :class:`~rpycsvc.cli.bench.sshd.PrivateSshd`, plus what the tests need: with
    ``netns``, sshd runs via ``ip netns exec NETNS`` and listens on ``address`` there (port 22
    unless given); clients must then run in a namespace too: ``ssh_argv(netns=...)``. It also
    serves sftp, and its clients use a faster key exchange.
    """

    name = "rpycsvc-test"
    no_banner_error = TimeoutError

    def __init__(
        self,
        *,
        netns: str | None = None,
        address: str = "127.0.0.1",
        port: int | None = None,
        alias: str | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        super().__init__(
            start_timeout,
            address=address,
            port=port or (22 if netns else 0),
            alias=alias or f"rpycsvc-sshd-{os.getpid()}-{id(self) & 0xFFFF:x}",
        )
        self.netns = netns

    # Paths inside our directory; valid after start().
    @property
    def config_path(self) -> Path:
        return self.config

    @property
    def key_path(self) -> Path:
        return self._path("client_key")

    @property
    def log_path(self) -> Path:
        return self._path("sshd.log")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

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

    def _sshd_lines(self) -> list[str]:
        """The bench's lines, with sftp, and a PATH with the sbin directories too (after a
        directory that offers the Python running the tests as ``python3.X``, as a host with
        that version installed would, so ``deploy`` finds the client's version there on every
        interpreter of the matrix)."""
        lines = [ln for ln in super()._sshd_lines() if not ln.startswith("SetEnv ")]
        path = f"{self.dir}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return [*lines, "AllowTcpForwarding yes", f"Subsystem sftp {SFTP_SERVER}",
                f"SetEnv SHLVL=1 PATH={path}"]

    def _client_options(self, **overrides: str) -> dict[str, str]:
        return super()._client_options(**{
            "ConnectTimeout": "5",
            "KexAlgorithms": "curve25519-sha256",  # the post-quantum default costs ~165 ms
            **overrides,
        })

    def variant_config(self, name: str, **overrides: str) -> Path:
        """Another client config for the same alias with some options replaced, e.g.
        ``IdentityFile=other_key`` (cumulative options can't be replaced with ``-o``)."""
        path = self._path(f"ssh_config-{name}")
        path.write_text(self._client_config(**overrides))
        return path

    def _sshd_argv(self) -> list[str]:
        argv = super()._sshd_argv()
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """In a namespace, a probe run there waits for the banner (we may not connect there
        from the root namespace)."""
        if not self.netns:
            return super()._wait_ready(proc)
        probe_args = [sys.executable, "-c", _PROBE, self.address, str(self.port)]
        probe = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *probe_args, str(self.start_timeout)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            return probe.wait(self.start_timeout + 10) == 0
        except subprocess.TimeoutExpired:
            probe.kill()
            probe.wait(5)
            return False
