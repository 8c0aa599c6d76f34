"""Finding servers, on the client side: hosts files and RPyC registries.

What ``Cluster``, ``rpycsvc status`` and ``rpycsvc top`` use to learn server addresses:
:func:`read_hosts_file`, :func:`discover` (ask a registry that ``rpycsvc registry`` or
``rpyc_registry`` runs) and the ``--discover`` command-line options. The registry itself
(the server that answers) is :mod:`rpycsvc.server.registry`; this module never loads it, so a
client that discovers servers imports nothing of the server side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rpyc.utils.registry import REGISTRY_PORT, TCPRegistryClient, UDPRegistryClient

from rpycsvc.errors import ConfigError, ConnectError

if TYPE_CHECKING:  # a client that only discovers needs no argparse
    import argparse

#: What :func:`discover` looks up: the names rpycsvc servers register under (RPyC derives
#: a service's name from its class name: ``ClassicComputeService`` → ``CLASSICCOMPUTE``;
#: ``--no-classic`` → ``COMPUTE``). ``SLAVE``, which classic servers also register as, would
#: find ``rpyc_classic`` servers too, which an rpycsvc client can't use.
RPYCSVC_NAMES = ("CLASSICCOMPUTE", "COMPUTE")


def read_hosts_file(path: str) -> list[str]:
    """``host[:port]`` per line; ``#`` starts a comment; blank lines are skipped."""
    try:
        with open(path) as f:
            lines = [ln.split("#", 1)[0].strip() for ln in f]
    except OSError as exc:
        raise ConfigError(f"can't read hosts file {path!r}: {exc.strerror or exc}") from exc
    hosts = [ln for ln in lines if ln]
    if not hosts:
        raise ConfigError(f"hosts file {path!r} names no servers")
    return hosts


def discover(registry_host: str = "127.0.0.1", registry_port: int = REGISTRY_PORT,
             mode: str = "TCP", timeout: float = 5.0) -> list[str]:
    """Ask a registry for rpycsvc servers; returns their ``"host:port"``, sorted, no repeats.

    The host is the address the server registered from, which RPyC binds to the server's
    own listening address, so it is the address to dial. An empty list means the registry
    answered but knows no server. A TCP registry that can't be reached raises
    :class:`~rpycsvc.errors.ConnectError`; UDP has no way to tell "nobody answered" from
    "nobody registered" and returns an empty list.
    """
    if mode.upper() == "TCP":
        client: Any = TCPRegistryClient(registry_host, port=registry_port, timeout=timeout)
    elif mode.upper() == "UDP":
        client = UDPRegistryClient(ip=registry_host, port=registry_port, timeout=timeout)
    else:
        raise ConfigError(f"registry mode must be TCP or UDP; got {mode!r}")
    found: set[tuple[str, int]] = set()
    for name in RPYCSVC_NAMES:
        try:
            found.update((str(h), int(p)) for h, p in client.discover(name))
        except OSError as exc:
            raise ConnectError(
                f"can't query the registry at {registry_host}:{registry_port} ({mode}): "
                f"{exc.strerror or exc}. Is `rpycsvc registry` running there?",
                address=f"{registry_host}:{registry_port}") from exc
    return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in sorted(found)]


def add_discover_arguments(p: argparse.ArgumentParser) -> None:
    """``--discover`` and the registry's address, shared by ``status`` and ``top``."""
    g = p.add_argument_group("discovery")
    g.add_argument("--discover", action="store_true",
                   help="also ask an RPyC registry for servers, see \"rpycsvc registry\" "
                   "(default: off)")
    g.add_argument("--registry-host", default="127.0.0.1", metavar="HOST",
                   help="the registry's address (default: %(default)s)")
    g.add_argument("--registry-port", type=int, default=REGISTRY_PORT, metavar="PORT",
                   help="the registry's port (default: %(default)s)")
    g.add_argument("--registry-type", choices=("TCP", "UDP"), default="TCP", type=str.upper,
                   help="registry protocol (default: %(default)s)")


def addresses_from_args(args: argparse.Namespace, timeout: float) -> list[str]:
    """The servers named on the command line plus, with ``--discover``, the registry's."""
    hosts: list[str] = []
    for h in args.hosts:
        hosts.extend(read_hosts_file(h[1:]) if h.startswith("@") else [h])
    if args.discover:
        for addr in discover(args.registry_host, args.registry_port, args.registry_type,
                             timeout):
            if addr not in hosts:
                hosts.append(addr)
    if not hosts:
        raise ConfigError("no servers: name some (HOST[:PORT] or @hostsfile)"
                          + (", or register them with the registry" if args.discover
                             else ", or use --discover"))
    return hosts
