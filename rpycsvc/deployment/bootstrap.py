"""Zero-install remote start over ssh: start an entry point on a host, or say why it failed.

execnet/mitogen style: nothing is copied to disk. ``start_remote`` runs
``ssh HOST exec python3 -c '<one line>'`` (with ``python=None``, the host's ``python3.X`` of
the client's version if it has one, else its ``python3``: see
:func:`~rpycsvc.deployment.loader.host_pythons`); that line checks the Python version and runs
the loader (:mod:`rpycsvc.deployment.loader`: the wire format, the ready line and the exit
codes), which reads the bundle (:mod:`rpycsvc.deployment.bundle`) from stdin, imports it from
memory, answers one ``RPYCSVC-READY`` line and hands the ssh pipes to an entry point
``"module:function"``. :func:`launch` does the same over any carrier
(:mod:`rpycsvc.deployment.remote_entry`), and a failed start is explained in one message
naming the host (:func:`_diagnose`).
"""

from __future__ import annotations

import contextlib
import selectors
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

from rpycsvc.deployment.bundle import build_bundle
from rpycsvc.deployment.loader import (
    EXIT_FRAMING,
    EXIT_IMPORT,
    EXIT_TOO_OLD,
    MIN_VERSION,
    READY_MARKER,
    host_pythons,
    remote_command,
)
from rpycsvc.deployment.remote_entry import RemoteEntry, RemoteProcess

_MAX_PREAMBLE = 64 * 1024  # junk a login script may print before our ready line


def start_remote(
    ssh_argv: Sequence[str],
    entry: str,
    packages: Sequence[str],
    *,
    python: str | Sequence[str] | None = "python3",
    timeout: float,
    host: str | None = None,
    min_version: tuple[int, int] = MIN_VERSION,
    memfd: bool = True,
) -> RemoteProcess:
    """Start ``entry`` (``"module:function"``, called as ``function(rfile, wfile)``) over ssh.

    ``ssh_argv`` is the ssh command up to and including the destination, e.g.
    ``["ssh", "-F", cfg, "host"]``; ``python`` is the remote interpreter (a name or path, or an
    argv prefix such as ``["nice", "python3"]``), or ``None`` for the first of
    :func:`host_pythons` the host has. Returns once the remote side sent its ready
    line, within ``timeout`` seconds; otherwise raises ``DeployError`` naming the host.
    """
    from rpycsvc.errors import DeployError

    if not ssh_argv or ":" not in entry:
        raise ValueError(f"need an ssh argv and a 'module:function' entry, got {entry!r}")
    where = host or ssh_argv[-1]
    command = remote_command(python, min_version=min_version, memfd=memfd)

    # A session of its own when ssh can't prompt (BatchMode=yes, as deploy always gives):
    # then a Ctrl-C or Jupyter interrupt (SIGINT to our process group) interrupts our code,
    # not ssh, which would end the server. An ssh that may prompt for a password or
    # passphrase needs our terminal (/dev/tty), so it stays in our session. Either way it
    # ends with us: at EOF on its stdin, whose write end only we hold.
    new_session = batch_mode(ssh_argv)

    def spawn() -> RemoteProcess:
        pipe = subprocess.PIPE
        try:
            proc = subprocess.Popen([*ssh_argv, command], stdin=pipe, stdout=pipe, stderr=pipe,
                                    start_new_session=new_session)
        except OSError as exc:
            raise DeployError(f"cannot run {ssh_argv[0]!r} to reach {where}: {exc}",
                              host=where) from exc
        return RemoteProcess(proc, where)

    remote = launch(spawn, entry, packages, python=python, timeout=timeout, host=where)
    assert isinstance(remote, RemoteProcess)
    return remote


def batch_mode(ssh_argv: Sequence[str]) -> bool:
    """Whether this ssh command line runs with ``BatchMode=yes`` (it never prompts).

    ssh keeps the first value given for an option, and the command line beats its config
    files, so the first ``-o BatchMode=...`` (or ``-oBatchMode ...``) decides; none: False.
    """
    args = list(ssh_argv[1:])
    for i, arg in enumerate(args):
        if arg == "-o" and i + 1 < len(args):
            option = args[i + 1]
        elif arg.startswith("-o") and len(arg) > 2:
            option = arg[2:]
        else:
            continue
        key, _, value = option.replace("=", " ", 1).strip().partition(" ")
        if key.lower() == "batchmode":
            return value.strip().lower() == "yes"
    return False


def launch(
    spawn: Callable[[], RemoteEntry],
    entry: str,
    packages: Sequence[str],
    *,
    python: str | Sequence[str] | None,
    timeout: float,
    host: str,
) -> RemoteEntry:
    """Start ``entry`` over what ``spawn()`` opens, already running a :func:`remote_command`
    (built with the same ``python``, which the error messages name): send the bundle and the
    entry name, wait for the ready line. Returns within ``timeout`` seconds, or raises
    ``DeployError`` naming ``host``; on any failure (Ctrl-C too) the carrier is ended."""
    from rpycsvc.errors import DeployError

    if ":" not in entry:
        raise ValueError(f"need a 'module:function' entry, got {entry!r}")
    frames = _frame(build_bundle(packages)) + _frame(entry.encode("utf-8"))
    deadline = time.monotonic() + timeout
    remote = spawn()
    # Sent by a thread: a remote that never reads must not block us past the deadline.
    writer = threading.Thread(target=_send, args=(remote, frames), daemon=True)
    writer.start()
    line, timed_out = None, True
    try:
        line, timed_out = _read_ready(remote, deadline)
    finally:
        if line is None:
            if timed_out:
                with contextlib.suppress(OSError):
                    remote.kill()
            remote.reap(5.0)  # after EOF on its output, the carrier is on its way out anyway
            writer.join(5.0)
    if line is None:
        raise DeployError(_diagnose(remote, python, timeout, timed_out), host=host)
    _, remote.python_version, pid, remote.python_executable = (line.split(None, 3) + [""] * 4)[:4]
    remote.remote_pid = int(pid) if pid.isdigit() else 0
    writer.join(max(0.1, deadline - time.monotonic()))
    return remote


def _frame(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def _send(remote: RemoteEntry, data: bytes) -> None:
    with contextlib.suppress(OSError, ValueError, EOFError):  # remote died: _diagnose says why
        remote.sendall(data)


def _read_ready(remote: RemoteEntry, deadline: float) -> tuple[str | None, bool]:
    """(ready line, False), or (None, timed out?) on EOF/deadline. Byte by byte: no read-ahead
    may swallow the entry's first bytes."""
    buf = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(remote.fileno(), selectors.EVENT_READ)
        while len(buf) < _MAX_PREAMBLE:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None, True
            try:
                byte = remote.recv(1)
            except (OSError, EOFError):
                byte = b""
            if not byte:
                return None, False
            buf += byte
            if byte == b"\n":
                start = buf.find(READY_MARKER)
                if start >= 0:
                    return buf[start:].decode("utf-8", "replace").strip(), False
                buf.clear()  # a login script's chatter: skip the line
    return None, False


def _diagnose(
    remote: RemoteEntry, python: str | Sequence[str] | None, timeout: float, timed_out: bool
) -> str:
    """One clear message naming the host, from ssh's exit status and stderr."""
    from rpycsvc.client.ssh import SSH_ERRORS

    code, err, host = remote.exit_status(), remote.stderr_text().strip(), remote.host
    tail = "\n".join([ln for ln in err.splitlines() if ln.strip()][-6:]) or "(no message)"
    shown = (" or ".join(host_pythons()) if python is None
             else python if isinstance(python, str) else " ".join(python))
    if timed_out:
        return (
            f"ssh to {host}: no ready handshake within {timeout} s (the host, the network "
            f"or the remote Python is too slow or stuck); stderr: {tail}"
        )
    if code == 255 or code is None:
        for needle, meaning in SSH_ERRORS.items():
            if needle in err:
                return f"ssh to {host} failed: {meaning}\nssh said: {tail}"
        return f"ssh to {host} failed (ssh exit {code}): {tail}"
    if code == 127:
        return (
            f"python not found on {host}: the remote shell could not run {shown!r} "
            "(command not found, exit 127); install Python >= 3.9 there or pass "
            f"python='/path/to/python3'. Remote said: {tail}"
        )
    meaning = {
        126: f"{shown!r} is not executable there (exit 126)",
        EXIT_TOO_OLD: "its Python is too old",
        EXIT_IMPORT: "the bundle failed to import; the remote traceback ends",
        EXIT_FRAMING: "the remote loader lost its input",
    }.get(code, f"the remote start failed (exit {code})")
    return f"deploy to {host} failed: {meaning}:\n{tail}"
