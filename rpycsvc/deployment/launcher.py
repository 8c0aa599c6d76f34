"""Deploy over SSH: run rpycsvc servers on hosts that have nothing but Python.

Each host gets ``ssh HOST python3 -c <loader>``; rpycsvc, rpyc and cloudpickle travel as
a zip over the ssh channel's stdin and are imported from memory (see
:mod:`rpycsvc.deployment.bootstrap`), and the server then speaks RPyC over the same ssh pipes. So
nothing is installed on the host and no port is opened there; the server also listens on a
private Unix socket (see :mod:`rpycsvc.client.attach`) so that more clients of the same user can
attach over ssh, and only that user can reach the server. When the connection ends —
``close()``, Ctrl-C, the client crashing, or the link dying — the server sees EOF and stops
with its workers (and removes its socket).

The system ``ssh`` client does the connecting (as plumbum's ``SshMachine`` does), so
``~/.ssh/config`` applies: keys, ports, users, jump hosts, ControlMaster. plumbum machines
(``SshMachine``, ``ParamikoMachine``, ``plumbum.local``) are taken too, and used through
their own connection: see :mod:`rpycsvc.deployment.machines`. What runs on the host is
:mod:`rpycsvc.deployment.host`; the ``rpycsvc deploy`` command is
:mod:`rpycsvc.deployment.command`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from rpycsvc.client.jobs import DEFAULT_RETRIES
from rpycsvc.client.ssh import ssh_argv
from rpycsvc.deployment.bootstrap import start_remote
from rpycsvc.deployment.host import ENTRY, SETTINGS_LEN
from rpycsvc.deployment.loader import host_pythons
from rpycsvc.deployment.machines import check_target, machine_kind, machine_name, start_on_machine
from rpycsvc.deployment.remote_entry import RemoteEntry
from rpycsvc.errors import AllServersFailedError, ConfigError, DeployError

log = logging.getLogger("rpycsvc.deploy")

#: What the bundle carries: rpycsvc and the pure-Python packages its server imports.
PACKAGES = ("rpycsvc", "rpyc", "cloudpickle")


class RemoteServer:
    """One deployed server: the ssh session (or channel, or local process) running it."""

    def __init__(self, host: str, remote: RemoteEntry, socket: str | None = None) -> None:
        self.host = host
        self.remote = remote
        #: the server's attach socket on the host (rpycsvc.client.attach), None: it has none
        self.socket = socket

    @property
    def pid(self) -> int:
        """The remote server's process id (on the remote host)."""
        return self.remote.remote_pid

    def stop(self, timeout: float = 10.0) -> None:
        """End the ssh session: the remote server sees EOF and stops with its workers."""
        self.remote.close(timeout)


def _start_one(host: str, target: Any, python: str | None, settings: dict[str, Any],
               timeout: float, ssh_command: Sequence[str],
               ssh_options: Sequence[str]) -> RemoteServer:
    """Start one server on ``target`` (a host string or a plumbum machine) named ``host``."""
    remote: RemoteEntry
    if isinstance(target, str):
        remote = start_remote(ssh_argv(target, ssh_command, ssh_options), ENTRY, PACKAGES,
                              python=python, timeout=timeout, host=host)
    else:
        remote = start_on_machine(target, ENTRY, PACKAGES, python=python, timeout=timeout,
                                  name=host)
    _say_which_python(host, python, remote, local=machine_kind(target) == "local")
    try:
        data = json.dumps(settings).encode()
        remote.sendall(SETTINGS_LEN.pack(len(data)) + data)
        started = _read_started(remote, time.monotonic() + timeout)  # rpycsvc.client.attach
    except (OSError, EOFError) as exc:
        remote.close(2.0)
        raise DeployError(f"{host}: the ssh channel closed while starting the server: "
                          f"{remote.stderr_text()[-500:] or exc}", host=host) from exc
    return RemoteServer(host, remote, started.get("socket"))


def _read_started(remote: RemoteEntry, deadline: float) -> dict[str, Any]:
    """The server's one answer to its settings (``{"socket": path or None}``), read
    without read-ahead: the RPyC connection follows on the same pipe."""
    import selectors

    buf = b""
    want = SETTINGS_LEN.size
    with selectors.DefaultSelector() as sel:
        sel.register(remote.fileno(), selectors.EVENT_READ)
        while len(buf) < want:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise OSError("no answer to the settings in time")
            chunk = remote.recv(want - len(buf))
            if not chunk:
                raise EOFError("the server ended while starting")
            buf += chunk
            if len(buf) == SETTINGS_LEN.size == want:
                want += SETTINGS_LEN.unpack(buf)[0]
                if want > SETTINGS_LEN.size + 65536:
                    raise OSError("implausible answer to the settings")
    answer = json.loads(buf[SETTINGS_LEN.size:])
    return answer if isinstance(answer, dict) else {}


def _say_which_python(host: str, python: str | None, remote: RemoteEntry,
                      local: bool = False) -> None:
    """Log which interpreter the host's server runs, and warn when its minor version is not
    this client's: tasks pickled by value (functions, lambdas) then can't run there."""
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    there = ".".join(remote.python_version.split(".")[:2])
    wanted = host_pythons()[0]
    how = (f"python={python!r}" if python is not None else
           "this client's own interpreter" if local else
           f"the host's {wanted}" if os.path.basename(remote.python_executable) == wanted else
           f"the host's python3: no {wanted} on its PATH")
    if there == here:
        log.info("%s: the server runs Python %s (%s, %s)", host, remote.python_version,
                 remote.python_executable, how)
    else:
        log.warning(
            "%s: the server runs Python %s (%s, %s) but this client runs Python %s: classic "
            "access and tasks named by import path work, tasks sent by value (functions, "
            "lambdas) need the same minor version; install python%s on the host, or pass "
            "python='/path/to/python%s'", host, remote.python_version,
            remote.python_executable, how, here, here, here)


def deploy(hosts: Iterable[Any] | str | Any, *, python: str | None = None,
           workers: int | None = None,
           threads: int | None = None, endpoints: Sequence[str] = (),
           services: Sequence[str] = (), classic: bool = True,
           ssh_command: Sequence[str] = ("ssh",), ssh_options: Sequence[str] = (),
           timeout: float = 60.0, require_all: bool = False, attach: bool = True,
           **cluster_options: Any) -> Any:
    """Start a server on every host, in parallel, and return a :class:`Cluster` of them.

    Use it as ``with rpycsvc.deploy(["user@host1", "host2:2222"]) as cluster: ...``:
    leaving the block (or ``cluster.close()``) stops every remote server and leaves nothing
    behind. A host is a string (``[user@]host[:port]`` or an ssh alias, reached with
    ``ssh_command`` and ``ssh_options``) or a plumbum machine: ``SshMachine``,
    ``ParamikoMachine`` or ``plumbum.local`` (used through its own connection and options,
    and never closed by rpycsvc; ``plumbum.local`` runs the server as a local process, with
    this client's interpreter unless ``python`` is given); one host or machine alone is a
    list of one. A machine is named ``user@host`` as given to it (``local`` for
    ``plumbum.local``) in ``cluster.addresses``, output prefixes and errors.
    Hosts that fail are reported in ``cluster.unreachable`` with their cause
    (authentication, unknown host, no python3, python too old), unless ``require_all``.
    ``python`` is the interpreter on the hosts (a name or path); by default the host's
    ``python3.X`` of this client's minor version, else its ``python3`` (a log line of
    ``rpycsvc.deploy`` says which, and warns when the versions differ: tasks sent by value
    need the same minor version).
    ``endpoints``/``services`` modules must be importable on the host (or be shipped in the
    bundle: add them to ``rpycsvc.deployment.launcher.PACKAGES``). Modules of this program's own
    project need neither: a host gets them when a task imports them (``forward_modules``,
    ``forward_packages`` as for :func:`rpycsvc.connect`; see :mod:`rpycsvc.protocol.forwarding`).
    With ``attach`` (the default) each server also listens on a private Unix socket on
    its host, so more clients of yours can reach it while it runs:
    ``cluster[i].server_info["attach"]`` is its address (``ssh://host/path``), for
    :func:`rpycsvc.connect`, ``rpycsvc status``, ``top`` and ``repl`` (see
    :mod:`rpycsvc.client.attach`); ``attach=False``: no socket, only this client.
    Other keywords go to the Cluster (``retries``, ``output``, task options).
    """
    from rpycsvc.client.cluster import Cluster
    from rpycsvc.client.opening import connect_stream
    from rpycsvc.client.output import OutputRouter
    from rpycsvc.client.taskoptions import check_options

    if isinstance(hosts, str) or _is_machine(hosts) or not hasattr(hosts, "__iter__"):
        targets = [hosts]  # one host alone (anything else is refused just below)
    else:
        targets = list(hosts)
    if not targets:
        raise ConfigError("deploy needs at least one host")
    for target in targets:
        check_target(target)
    hosts = _unique_names([t if isinstance(t, str) else machine_name(t) for t in targets])
    settings = {"workers": workers or 0, "threads": 256 if threads is None else threads,
                "endpoints": list(endpoints), "services": list(services), "classic": classic,
                "keepalive": KEEPALIVE_TIMEOUT, "attach": bool(attach)}
    output = cluster_options.pop("output", "stream")
    prefix = cluster_options.pop("prefix", "[{address}] ")
    forward_logging = cluster_options.pop("forward_logging", False)
    retries = cluster_options.pop("retries", DEFAULT_RETRIES)
    # module forwarding (rpycsvc.protocol.forwarding): the hosts get our project's modules on demand
    forwarding = {k: cluster_options.pop(k) for k in ("forward_modules", "forward_packages")
                  if k in cluster_options}
    # Refuse bad options before anything starts on a host.
    from rpycsvc.server.config import ServerConfig

    ServerConfig(endpoints=list(endpoints), services=list(services),
                 classic=classic).check_serves_something()
    OutputRouter(output, prefix, forward_logging)
    check_options(cluster_options)
    if not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"retries must be an int >= 0; got {retries!r}")
    started: dict[str, RemoteServer | BaseException] = {}
    cancelled = threading.Event()
    lock = threading.Lock()

    def start(host: str, target: Any) -> None:
        try:
            res: RemoteServer | BaseException = _start_one(
                host, target, python, settings, timeout, ssh_command, ssh_options)
        except BaseException as exc:
            res = exc
        with lock:
            late = cancelled.is_set()
            if not late:
                started[host] = res
        if late and isinstance(res, RemoteServer):
            res.stop(2.0)  # deploy was abandoned (Ctrl-C, deadline) while we started

    threads_ = [threading.Thread(target=start, args=(h, t), daemon=True)
                for h, t in zip(hosts, targets)]
    clients: list[Any] = []
    owned: list[RemoteServer] = []
    try:
        for t in threads_:
            t.start()
        deadline = time.monotonic() + timeout + 10
        for t in threads_:
            t.join(max(0.0, deadline - time.monotonic()))
        with lock:
            cancelled.set()  # from now on a late start stops itself
            results = dict(started)
        failed: dict[str, BaseException] = {}
        for host in hosts:
            res = results.get(host)
            if res is None:
                failed[host] = DeployError(f"{host}: deploy did not finish in time", host=host)
            elif isinstance(res, BaseException):
                failed[host] = res
            else:
                owned.append(res)
        for res in list(owned):
            try:
                stream = res.remote.stream()
                clients.append(connect_stream(
                    stream, address=res.host,
                    router=OutputRouter(output, prefix, forward_logging), **forwarding,
                    **cluster_options))
                _tell_attach(clients[-1], res, targets[hosts.index(res.host)], ssh_options)
            except BaseException as exc:
                owned.remove(res)
                res.stop(2.0)
                failed[res.host] = DeployError(
                    f"{res.host}: the deployed server did not answer: {exc}; remote said: "
                    f"{res.remote.stderr_text()[-500:]}", host=res.host)
        if failed and (require_all or not clients):
            if not clients:
                raise AllServersFailedError("no host could be deployed to", failed)
            raise DeployError("not every host could be deployed to: " +
                              "; ".join(f"{h}: {e}" for h, e in failed.items()))
        cluster = Cluster.from_clients(clients, owned=owned, unreachable=failed,
                                       retries=retries, **cluster_options)
    except BaseException:
        with lock:
            cancelled.set()
            leftovers = [r for r in started.values() if isinstance(r, RemoteServer)]
        for c in clients:
            c.close()
        for r in {id(r): r for r in [*owned, *leftovers]}.values():
            r.stop(2.0)
        raise
    for c in clients:
        _start_keepalive(c)
    return cluster


def _tell_attach(client: Any, res: RemoteServer, target: Any,
                 ssh_options: Sequence[str]) -> None:
    """Put the server's attach address in ``client.server_info["attach"]`` and log how to
    attach (rpycsvc.client.attach)."""
    if not res.socket:
        return
    from rpycsvc.client.attach import attach_address

    if isinstance(target, str):
        address = attach_address(target, res.socket)
    elif machine_kind(target) == "local":
        address, ssh_options = f"unix://{res.socket}", ()
    else:  # (the machine's own ssh options are not known to a second client)
        address, ssh_options = attach_address(machine_name(target), res.socket), ()
    client.server_info["attach"] = address
    log.info("%s: more clients can attach: %s", res.host, attach_command(address, ssh_options))


def attach_command(address: str, ssh_options: Sequence[str] = ()) -> str:
    """The shell line that shows a deployed server from another terminal: ``rpycsvc status
    ADDRESS``, with the ssh options deploy used in ``RPYCSVC_SSH_OPTIONS``."""
    env = (f"RPYCSVC_SSH_OPTIONS={shlex.quote(' '.join(map(shlex.quote, ssh_options)))} "
           if ssh_options and address.startswith("ssh://") else "")
    return f"{env}rpycsvc status {shlex.quote(address)}"


def _is_machine(obj: object) -> bool:
    return machine_kind(obj) is not None


def _unique_names(names: list[str]) -> list[str]:
    """The names as given, a repeated one numbered (``host#2``): each server gets its own
    address (two machines may reach the same host, e.g. as different users)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


#: A deployed server stops when it hears nothing from its client for this long (seconds):
#: sshd alone may not notice a dead link for minutes or hours. Clients ping every
#: KEEPALIVE_INTERVAL.
KEEPALIVE_TIMEOUT = 10.0
KEEPALIVE_INTERVAL = 2.0


def _start_keepalive(client: Any) -> None:
    """Ping the deployed server every KEEPALIVE_INTERVAL so its watchdog knows we're here."""
    import rpyc

    ping = rpyc.async_(client.conn.root.ping)

    def loop() -> None:
        while not client.closed:
            try:
                ping()
            except Exception:
                return
            time.sleep(KEEPALIVE_INTERVAL)

    threading.Thread(target=loop, name=f"rpycsvc-keepalive-{client.address}",
                     daemon=True).start()
