"""plumbum machines as deploy targets: ``SshMachine``, ``ParamikoMachine`` and ``plumbum.local``.

RPyC's zero-deploy takes plumbum machines (``DeployedServer(machine)``); so does
:func:`rpycsvc.deploy`, beside host strings. The server starts over the machine's own
connection and is then reached over the same channel, exactly as for a host string (see
:mod:`rpycsvc.deployment.bootstrap`): nothing is copied to disk, no port is opened, no tunnel
is made.

- ``SshMachine`` (and ``PuttyMachine``): ``machine.popen(...)`` runs the machine's own ``ssh``
  command with its options (user, port, key, ``ssh_opts``), its working directory and its
  environment changes; its pipes carry the bundle and then RPyC.
- ``ParamikoMachine``: ``machine.popen(...)`` opens a session channel on the machine's
  paramiko transport; the channel carries the bundle and then RPyC (``SocketStream`` over
  the channel, as RPyC does).
- ``plumbum.local``: the server runs as a local process under ``local.env``/``local.cwd``,
  in a session of its own (a Ctrl-C meant for the client doesn't reach it); with
  ``python=None`` it is this client's own interpreter (same version, so every task works).

The machine stays the caller's: deploy opens one channel or process per server and ends
only that, never the machine's connection (RPyC 6.0.2's ``DeployedServer.close()`` closes
the machine it was given). Nothing here imports plumbum or paramiko: a machine can only
exist once its module is imported, so the checks look the classes up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from rpycsvc.deployment.bootstrap import launch
from rpycsvc.deployment.loader import remote_command
from rpycsvc.deployment.remote_entry import RemoteChannel, RemoteEntry, RemoteProcess

#: What deploy accepts as a host, for error messages.
ACCEPTED = (
    "a host string ('[user@]host[:port]' or an ssh alias), a plumbum SshMachine, "
    "ParamikoMachine, or plumbum.local"
)

#: ssh options added for a ``SshMachine``'s server channel (the machine's own come first and
#: win): notice a dead link. No BatchMode: a machine made with ``password=`` needs its prompt.
#: Not for ``PuttyMachine``: plink has no ``-o``.
SSH_MACHINE_OPTS = ("-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=3")

_CLASSES = {  # kind -> (module, class): subclasses count (PuttyMachine is a SshMachine)
    "ssh": ("plumbum.machines.ssh_machine", "SshMachine"),
    "paramiko": ("plumbum.machines.paramiko_machine", "ParamikoMachine"),
    "local": ("plumbum.machines.local", "LocalMachine"),
}


def machine_kind(obj: object) -> str | None:
    """``"ssh"``, ``"paramiko"`` or ``"local"`` for a plumbum machine deploy can use, else
    None."""
    for kind, (module, name) in _CLASSES.items():
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(obj, cls):
            return kind
    return None


def machine_name(machine: Any) -> str:
    """How a machine is named in addresses, output prefixes and errors: ``user@host`` as
    given to plumbum (``str(machine)`` without its ``ssh://`` scheme), or ``local``."""
    if machine_kind(machine) == "local":
        return "local"
    return str(machine).split("://", 1)[-1]


def check_target(obj: object) -> None:
    """Refuse anything deploy can't start a server on, naming what it accepts."""
    if isinstance(obj, str):
        return
    if machine_kind(obj) is None:
        raise TypeError(
            f"deploy can't use {obj!r} (a {type(obj).__name__}) as a host: it takes {ACCEPTED}"
        )
    if machine_kind(obj) == "paramiko" and getattr(obj, "_get_pty", False):
        from rpycsvc.errors import ConfigError

        raise ConfigError(
            f"{machine_name(obj)}: a ParamikoMachine made with get_pty=True "
            "can't carry the binary protocol (a terminal rewrites the bytes); "
            "make one without get_pty for deploy"
        )


class _Words:
    """A ready-made command line for ``ParamikoMachine.popen`` (it calls ``formulate()``)."""

    def __init__(self, line: str) -> None:
        self.line = line

    def formulate(self, level: int = 0, args: Sequence[str] = ()) -> list[str]:
        return [self.line]


def start_on_machine(
    machine: Any,
    entry: str,
    packages: Sequence[str],
    *,
    python: str | Sequence[str] | None,
    timeout: float,
    name: str,
) -> RemoteEntry:
    """Start ``entry`` on a plumbum machine, over the machine's own connection (see the
    module docstring); as :func:`rpycsvc.deployment.bootstrap.start_remote` otherwise."""
    from rpycsvc.errors import DeployError

    kind = machine_kind(machine)
    if kind == "local":
        return _start_local(machine, entry, packages, python=python, timeout=timeout, name=name)
    # plumbum puts "env K=V" before our words when the machine's environment was changed,
    # and env can't run the shell's exec: leave exec out then (one more shell in between).
    exec_ = not machine.env.getdelta()
    command = remote_command(python, exec_=exec_)

    def spawn() -> RemoteEntry:
        try:
            if kind == "ssh":
                putty = type(machine).__name__ == "PuttyMachine"
                opts = [] if putty else list(SSH_MACHINE_OPTS)
                proc = machine.popen([command], ssh_opts=opts)
                return RemoteProcess(proc, name)
            popen = machine.popen(_Words(command))
            return RemoteChannel(popen.channel, name, owner=popen)
        except Exception as exc:
            raise DeployError(
                f"cannot start a command on {name} through its {kind} machine: "
                f"{type(exc).__name__}: {exc}",
                host=name,
            ) from exc

    return launch(spawn, entry, packages, python=python, timeout=timeout, host=name)


def _start_local(
    machine: Any,
    entry: str,
    packages: Sequence[str],
    *,
    python: str | Sequence[str] | None,
    timeout: float,
    name: str,
) -> RemoteEntry:
    from rpycsvc.errors import DeployError

    chosen = sys.executable if python is None else python
    # deathsig=False: we start it from a thread that ends soon (see loader.LOADER); it
    # still stops on EOF when we close the pipe, or when this process dies.
    command = remote_command(chosen, deathsig=False)

    def spawn() -> RemoteEntry:
        try:
            # A session of its own (as Cluster.local's servers): a Ctrl-C in the terminal or a
            # Jupyter kernel interrupt (SIGINT to our process group) interrupts our code, not
            # the server. It still ends with us: at EOF on its stdin, whose write end only we
            # hold, when we close it or when this process dies (even by SIGKILL).
            proc = machine["sh"]["-c", command].popen(start_new_session=True)
        except Exception as exc:
            raise DeployError(
                f"cannot start a local server: {type(exc).__name__}: {exc}", host=name
            ) from exc
        return RemoteProcess(proc, name)

    return launch(spawn, entry, packages, python=chosen, timeout=timeout, host=name)
