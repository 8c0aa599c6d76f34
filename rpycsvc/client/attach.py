"""Attaching to a deployed server: ``connect("ssh://[user@]host/path/server.sock")``.

The client's end of what :mod:`rpycsvc.server.attach` describes: ssh to the host runs a
small forwarder there (a few lines of the host's standard library, sent inline) that joins
the ssh session's pipes to the server's private Unix socket, and the client speaks the
normal rpycsvc protocol over those pipes. ``unix:///path`` reaches a socket on this machine
directly (a server deployed on ``plumbum.local``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

from rpycsvc.client.connection import Client
from rpycsvc.client.opening import connect_stream
from rpycsvc.client.output import OutputRouter
from rpycsvc.client.ssh import SSH_ERRORS, ssh_argv
from rpycsvc.client.taskoptions import check_options
from rpycsvc.errors import ConfigError, ConnectError
from rpycsvc.protocol.pipes import FastPipeStream

log = logging.getLogger("rpycsvc.attach")

#: Exit status of the forwarder when the socket can't be reached.
EXIT_NO_SOCKET = 3

# Runs on the host under its python3 (any 3.x), as `python3 -c FORWARDER SOCKET_PATH`: stdin
# -> socket in a thread, socket -> stdout here; the first end that closes ends the process,
# which ends the ssh session (and, on the other side, the attached connection).
FORWARDER = r"""
import os, socket, sys, threading
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    sys.stderr.write("rpycsvc-attach: cannot connect to %s: %s\n" % (sys.argv[1], e))
    sys.stderr.flush()
    os._exit(3)
def up():
    try:
        while True:
            d = os.read(0, 1 << 20)
            if not d:
                break
            s.sendall(d)
    except OSError:
        pass
    os._exit(0)
threading.Thread(target=up, daemon=True).start()
try:
    while True:
        d = s.recv(1 << 20)
        if not d:
            break
        v = memoryview(d)
        while v:
            v = v[os.write(1, v):]
except OSError:
    pass
os._exit(0)
"""



# -- the client side ---------------------------------------------------------------------------
def attach_address(host: str, path: str) -> str:
    """The address a second client attaches with: ``ssh://HOST/PATH`` (``host`` as given
    to ``deploy``: ``[user@]host[:port]``, ``[v6]:port`` or an ssh alias)."""
    return f"ssh://{host}{path}"


def split_address(address: str) -> tuple[str, str, str]:
    """``"ssh://[user@]host[:port]/path"`` → ``("ssh", "[user@]host[:port]", "/path")``;
    ``"unix:///path"`` → ``("unix", "", "/path")``. ``ConfigError`` otherwise."""
    scheme, sep, rest = address.strip().partition("://")
    if not sep or scheme not in ("ssh", "unix"):
        raise ConfigError(f"bad attach address {address!r}: expected "
                          "ssh://[user@]host[:port]/path/to/server.sock or unix:///path")
    host, slash, path = rest.partition("/")
    if scheme == "unix":
        if host or not slash:
            raise ConfigError(f"bad attach address {address!r}: expected unix:///path")
    elif not host or not slash or not path:
        raise ConfigError(f"bad attach address {address!r}: expected "
                          "ssh://[user@]host[:port]/path/to/server.sock (the path is what "
                          "deploy printed)")
    return scheme, host, "/" + path


def _env_argv(name: str, default: Sequence[str]) -> list[str]:
    value = os.environ.get(name)
    return shlex.split(value) if value else list(default)


def attach_argv(address: str, *, ssh_command: Sequence[str] | None = None,
                ssh_options: Sequence[str] | None = None,
                python: str = "python3") -> list[str]:
    """The ssh command line that attaches to ``address`` (an ``ssh://`` address)."""
    _, host, path = split_address(address)
    command = _env_argv("RPYCSVC_SSH_COMMAND", ("ssh",)) if ssh_command is None \
        else list(ssh_command)
    options = _env_argv("RPYCSVC_SSH_OPTIONS", ()) if ssh_options is None else list(ssh_options)
    remote = " ".join(["exec", shlex.quote(python), "-c", shlex.quote(FORWARDER),
                       shlex.quote(path)])
    return [*ssh_argv(host, command, options), remote]


def connect_attached(address: str, *, timeout: float = 10.0,
                     ssh_command: Sequence[str] | None = None,
                     ssh_options: Sequence[str] | None = None, python: str = "python3",
                     output: str = "stream", prefix: str = "[{address}] ",
                     forward_logging: bool = False, **kwargs: Any) -> Client:
    """A :class:`~rpycsvc.Client` of a deployed server, attached through its socket.

    ``address`` is ``ssh://[user@]host[:port]/path/to/server.sock`` (reached through ssh,
    see the module's text) or ``unix:///path`` (on this machine). ``python`` is the host's
    interpreter for the forwarder. Other keywords as for :func:`rpycsvc.connect`
    (``lost_after``, ``forward_modules``, task options); ``authkey`` is not used (ssh and
    the socket's permissions are the credentials) and ``ssl`` is refused. Closing the
    client ends the ssh session. Failures raise :class:`~rpycsvc.ConnectError` saying why.
    """
    kwargs.pop("authkey", None)
    if kwargs.pop("ssl", None):
        raise ConfigError(f"{address}: ssl= does not apply to an attach address (ssh "
                          "encrypts and authenticates it)")
    kwargs.pop("server_hostname", None)
    kwargs.pop("lanes", None)
    scheme, _, path = split_address(address)
    router = OutputRouter(output, prefix, forward_logging)
    check_options({k: v for k, v in kwargs.items()
                    if k not in ("lost_after", "forward_modules", "forward_packages")})
    if scheme == "unix":
        return _connect_unix(address, path, timeout, router, kwargs)
    argv = attach_argv(address, ssh_command=ssh_command, ssh_options=ssh_options,
                       python=python)
    proc = _Ssh(argv, address)
    try:
        client = connect_stream(proc.stream(), address=address, router=router,
                                hello_timeout=timeout, **kwargs)
    except BaseException as exc:
        why = proc.failure(exc)
        proc.end()
        if isinstance(exc, Exception):
            raise ConnectError(why, address=address) from exc
        raise
    client.on_lost(lambda _client, _exc: proc.end_later())
    return client


def _connect_unix(address: str, path: str, timeout: float, router: OutputRouter,
                  kwargs: dict[str, Any]) -> Client:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.settimeout(None)
        rfile = os.fdopen(os.dup(sock.fileno()), "rb", buffering=0)
        wfile = os.fdopen(os.dup(sock.fileno()), "wb", buffering=0)
    except OSError as exc:
        raise ConnectError(f"can't attach to {address}: {exc.strerror or exc} (the deployed "
                           "server has stopped, or the path is not its socket)",
                           address=address) from exc
    finally:
        sock.close()  # the stream holds its own descriptors
    try:
        return connect_stream(FastPipeStream(rfile, wfile), address=address, router=router,
                              hello_timeout=timeout, **kwargs)
    except EOFError as exc:
        raise ConnectError(f"{address} closed the connection while we were attaching "
                           f"(was it refused? only the server's own user may attach): {exc}",
                           address=address) from exc


class _Ssh:
    """The ssh process of one attached client: its pipes carry the connection, its stderr
    is kept (the last 16 KiB) to say why an attach failed."""

    def __init__(self, argv: list[str], address: str) -> None:
        self.address = address
        try:
            # its own session: a Ctrl-C meant for our program must not end the connection
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise ConnectError(f"cannot run {argv[0]!r} to attach to {address}: {exc}",
                               address=address) from exc
        self._err = bytearray()
        self._reader = threading.Thread(target=self._collect, daemon=True,
                                        name="rpycsvc-attach-stderr")
        self._reader.start()
        self._ended = False

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        with contextlib.suppress(OSError, ValueError):
            while chunk := os.read(fd, 65536):
                self._err += chunk
                del self._err[:-16384]

    def stream(self) -> FastPipeStream:
        return FastPipeStream(self.proc.stdout, self.proc.stdin)

    def failure(self, exc: BaseException) -> str:
        """Why the attach failed, from ssh's exit status and what it (or the forwarder)
        said; waits a little for ssh to end."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5.0)
        self._reader.join(1.0)
        code = self.proc.poll()
        said = self._err.decode("utf-8", "replace").strip()
        tail = "\n".join(ln for ln in said.splitlines()[-4:] if ln.strip()) or "(nothing)"
        if code == EXIT_NO_SOCKET:
            return (f"can't attach to {self.address}: no server listens there (it has "
                    f"stopped, or the path is not its socket); the host said: {tail}")
        if code == 255:
            for needle, meaning in SSH_ERRORS.items():
                if needle in said:
                    return f"can't attach to {self.address}: ssh failed: {meaning}\n{tail}"
            return f"can't attach to {self.address}: ssh failed (exit 255): {tail}"
        if code == 127:
            return (f"can't attach to {self.address}: no python3 on the host's PATH (pass "
                    f"python='/path/to/python3'): {tail}")
        return (f"can't attach to {self.address}: {type(exc).__name__}: {exc} "
                f"(ssh exit {code}); the host said: {tail}")

    def end(self, timeout: float = 5.0) -> None:
        """Close our ends of the pipes and reap ssh (killed if it lingers)."""
        if self._ended:
            return
        self._ended = True
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if pipe is not None:
                    pipe.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)
        self._reader.join(1.0)
        if self.proc.stderr is not None:
            with contextlib.suppress(OSError):
                self.proc.stderr.close()

    def end_later(self) -> None:
        """:meth:`end` in a thread: called from the client's reader when it is lost."""
        threading.Thread(target=self.end, daemon=True, name="rpycsvc-attach-reap").start()
