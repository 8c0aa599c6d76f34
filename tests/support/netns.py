"""Simulated hosts for multi-host tests: network namespaces joined by a bridge.

``NetnsNetwork(hosts=3)`` makes a client namespace and N host namespaces, each with ``eth0``
in 10.77.0.0/24, cabled by veth pairs to a bridge living in a namespace of its own. Nothing is
connected to the root namespace and no namespace has a default route, so traffic stays among
the namespaces created here. **Rule:** both ends of every connection run inside these
namespaces (``exec_argv(ns)``); never connect from the root namespace to a 10.77 address.

Names carry a per-run prefix (``rpycsvc-<pid>-<random>``), so parallel runs never collide;
``close()`` deletes every namespace created (their veths go with them).
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
import time

PREFIX = "rpycsvc-"
SUBNET = "10.77.0"
CLIENT_ADDRESS = f"{SUBNET}.2"
# Neighbour discovery tuned so that a connect to a cut host fails in ~0.6 s, not ~3 s.
_NEIGH_SYSCTLS = {"mcast_solicit": "3", "ucast_solicit": "3", "retrans_time_ms": "200"}


def exec_argv(ns: str) -> list[str]:
    """The argv prefix that runs a command inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns]


def _ip(*args: str, timeout: float = 10.0) -> None:
    proc = subprocess.run(
        ["ip", *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.decode().strip()}")


def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def netns_available() -> str | None:
    """None if namespaces with veth pairs can be made here, else why not (a skip reason)."""
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}{os.getpid()}-probe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create veth pairs or bridges: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def sweep_stale() -> list[str]:
    """Delete namespaces left by crashed runs of ours (prefix + a pid that no longer runs)."""
    removed = []
    for name in list_namespaces():
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
            removed.append(name)
    return removed


class NetnsNetwork:
    """A client namespace and ``hosts`` host namespaces on one bridge.

    ``client`` and ``hosts`` hold namespace names; ``address(ns)`` gives its 10.77.0.x
    address; ``cut(host)``/``restore(host)`` unplug and replug that host's cable.
    """

    def __init__(self, hosts: int = 3) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError(f"hosts must be between 1 and 200, got {hosts!r}")
        self.prefix = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.prefix}-sw"
        self.client = f"{self.prefix}-c"
        self.hosts = [f"{self.prefix}-h{i}" for i in range(1, hosts + 1)]
        self._addresses = {self.client: CLIENT_ADDRESS}
        self._addresses.update({ns: f"{SUBNET}.{10 + i}" for i, ns in enumerate(self.hosts, 1)})
        self._ports = {ns: f"p{i}" for i, ns in enumerate([self.client, *self.hosts])}
        self._created: list[str] = []

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this network owns (switch first)."""
        return [self.switch, self.client, *self.hosts]

    def address(self, ns: str) -> str:
        """The IPv4 address of ``ns``'s ``eth0``."""
        try:
            return self._addresses[ns]
        except KeyError:
            raise ValueError(f"{ns!r} is not a member of network {self.prefix!r}") from None

    exec_argv = staticmethod(exec_argv)

    def start(self) -> NetnsNetwork:
        """Create namespaces, bridge, cables and addresses; all or nothing."""
        try:
            for ns in self.namespaces:
                _ip("netns", "add", ns)
                self._created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for ns, port in self._ports.items():
                # Both ends are created straight inside namespaces: the root namespace
                # never sees an interface of ours.
                _ip(
                    *f"-n {self.switch} link add {port} type veth peer name eth0 netns {ns}".split()
                )
                _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.address(ns)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                self._tune_neighbours(ns)
        except BaseException:
            self.close()
            raise
        return self

    def _tune_neighbours(self, ns: str) -> None:
        script = "".join(
            f"echo {value} > /proc/sys/net/ipv4/neigh/eth0/{key};"
            for key, value in _NEIGH_SYSCTLS.items()
        )
        subprocess.run(
            [*exec_argv(ns), "sh", "-c", script], check=True, capture_output=True, timeout=10
        )

    def _check_host(self, host: str) -> None:
        if host not in self._ports:
            raise ValueError(f"{host!r} is not a member of network {self.prefix!r}")

    def cut(self, host: str) -> None:
        """Unplug ``host``: its switch port goes down and neighbours forget it, so open TCP
        connections hang and new connects fail fast (no route to host)."""
        self._check_host(host)
        _ip("-n", self.switch, "link", "set", "dev", self._ports[host], "down")
        for ns in self._ports:
            if ns != host:
                subprocess.run(
                    ["ip", "-n", ns, "neigh", "flush", "to", self.address(host)],
                    capture_output=True,
                    timeout=10,
                )

    def restore(self, host: str) -> None:
        """Plug ``host`` back in; connections that survived the cut resume."""
        self._check_host(host)
        _ip("-n", self.switch, "link", "set", "dev", self._ports[host], "up")

    def close(self, timeout: float = 10.0) -> None:
        """Delete every namespace we created; verified gone within ``timeout``.

        Stop processes running inside first: a namespace lives on, nameless, while they do."""
        errors = []
        for ns in reversed(self._created):
            proc = subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
            if proc.returncode != 0:
                errors.append(f"{ns}: {proc.stderr.decode().strip()}")
        self._created.clear()
        deadline = time.monotonic() + timeout
        left = [ns for ns in list_namespaces() if ns.startswith(self.prefix + "-")]
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [ns for ns in list_namespaces() if ns.startswith(self.prefix + "-")]
        if left:
            errors.append(f"still present: {left}")
        if errors:
            raise RuntimeError(f"cleanup of network {self.prefix!r} failed: {errors}")

    def __enter__(self) -> NetnsNetwork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
