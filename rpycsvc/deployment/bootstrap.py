"""Zero-install remote start over ssh, execnet/mitogen style: nothing is copied to disk.

``start_remote`` runs ``ssh HOST exec python3 -c '<one line>'`` (with ``python=None``, the
host's ``python3.X`` of the client's version if it has one, else its ``python3``: see
:func:`host_pythons`); that line checks the Python version and runs ``LOADER``, which reads
a zip of our pure-Python packages from stdin, imports it from memory (a ``memfd`` served to
zipimport, else a meta-path importer), answers one ``RPYCSVC-READY`` line and hands the ssh
pipes to an entry point ``"module:function"``.

Wire format on stdin: ``>Q`` length + bundle zip, ``>Q`` length + entry name (UTF-8), then
whatever the entry speaks. The loader writes exactly one line before the entry runs::

    RPYCSVC-READY <python version> <remote pid> <sys.executable>\\n

The entry is called as ``function(rfile, wfile)``: buffered binary files on the channel (flush
``wfile``), while fd 0 is /dev/null and fd 1 goes to stderr. It returns the exit code and must
return on EOF. With memfd, ``sys.path[0]``, ``PYTHONPATH`` and ``RPYCSVC_BUNDLE`` hold
``/proc/<pid>/fd/<n>`` (``RPYCSVC_BUNDLE_FD`` is ``n``): child interpreters import the bundle
too, while the loader lives. The loader also dies with its sshd session (PR_SET_PDEATHSIG).

Remote exit codes: 0 the entry returned, ``EXIT_TOO_OLD`` (90), ``EXIT_IMPORT`` (91),
``EXIT_FRAMING`` (92), ``EXIT_ENTRY_RAISED`` (93); the remote shell uses 126/127 when the
interpreter is not executable/not found, and ssh itself 255.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import selectors
import shlex
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from binascii import b2a_base64
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

EXIT_TOO_OLD = 90
EXIT_IMPORT = 91
EXIT_FRAMING = 92
EXIT_ENTRY_RAISED = 93
READY_MARKER = b"RPYCSVC-READY "
MIN_VERSION = (3, 9)
_MAX_PREAMBLE = 64 * 1024  # junk a login script may print before our ready line
_STDERR_KEEP = 64 * 1024

# Runs remotely, after the version check, with globals ``M`` (1: try memfd_create) and ``D``
# (1: die with the parent process: see _main; 0 for a local child of a short-lived thread). Its
# stdin/stdout are the ssh channel, so it reads with os.read (no read-ahead buffer may swallow
# the entry's bytes) and moves the channel off fds 0/1: a stray print or a child process can
# then never write into, or read from, the protocol stream.
LOADER = r"""
import os, struct, sys, threading, traceback

def _fail(code, msg):
    sys.stderr.write("rpycsvc-loader: %s\n" % msg)
    sys.stderr.flush()
    os._exit(code)

def _read_frame(fd, what, limit):
    want, parts, header = 8, [], True
    while want > 0:
        chunk = os.read(fd, min(want, 1 << 20))
        if not chunk:
            _fail(92, "input closed before the %s arrived" % what)
        parts.append(chunk)
        want -= len(chunk)
        if want == 0 and header:
            (want,), parts, header = struct.unpack(">Q", b"".join(parts)), [], False
            if want > limit:
                _fail(92, "implausible %s length %d: not an rpycsvc peer?" % (what, want))
    return b"".join(parts)

class _MemoryImporter(object):
    # Serves .py modules straight from the zip bytes, for systems without memfd_create.
    def __init__(self, data):
        import io, zipfile
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            self.files = dict((n, z.read(n)) for n in z.namelist())
    def _locate(self, fullname):
        base = fullname.replace(".", "/")
        for name, pkg in ((base + "/__init__.py", True), (base + ".py", False)):
            if name in self.files:
                return name, pkg
        return None, False
    def find_spec(self, fullname, path=None, target=None):
        import importlib.util
        name, pkg = self._locate(fullname)
        return name and importlib.util.spec_from_loader(
            fullname, self, origin="<rpycsvc-bundle>/" + name, is_package=pkg)
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        module.__file__ = module.__spec__.origin
        code = self.files[self._locate(module.__name__)[0]]
        exec(compile(code, module.__file__, "exec", dont_inherit=True), module.__dict__)
    def is_package(self, fullname):
        return self._locate(fullname)[1]
    def get_source(self, fullname):  # lets tracebacks show bundle source lines
        return self.files[self._locate(fullname)[0]].decode("utf-8", "replace")

def _main():
    # sshd sends no SIGHUP to a command without a pty; when the connection dies the sshd
    # session process (our parent, thanks to exec) exits, and the kernel then TERMs us.
    # (Not for a local child: the "parent" of PR_SET_PDEATHSIG is the thread that started
    # us, and deploy starts servers from threads that end right after.)
    ppid = os.getppid()
    try:
        import ctypes, signal
        if D:
            ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != ppid:
                _fail(92, "the ssh session ended during start-up")
    except Exception:
        pass
    in_fd, out_fd = os.dup(0), os.dup(1)  # dup() makes them non-inheritable
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    bundle = _read_frame(in_fd, "bundle", 1 << 31)
    entry = _read_frame(in_fd, "entry name", 4096).decode("utf-8")
    path = None
    if M and hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("rpycsvc-bundle")
            view = memoryview(bundle)
            while view:
                view = view[os.write(fd, view):]
            del view
            # /proc/<pid>, not /proc/self: child interpreters get sys.path via PYTHONPATH.
            path = "/proc/%d/fd/%d" % (os.getpid(), fd)
            os.stat(path)
        except OSError:
            path = None
    if path:
        sys.path.insert(0, path)
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = path + (os.pathsep + old if old else "")
        os.environ["RPYCSVC_BUNDLE_FD"], os.environ["RPYCSVC_BUNDLE"] = str(fd), path
    else:
        sys.meta_path.insert(0, _MemoryImporter(bundle))
    del bundle
    try:
        import importlib
        modname, _, attrs = entry.partition(":")
        func = importlib.import_module(modname)
        for attr in attrs.split("."):
            func = getattr(func, attr)
    except BaseException:
        traceback.print_exc()
        _fail(91, "cannot load entry point %r from the bundle" % entry)
    ready = ("RPYCSVC-READY %d.%d.%d %d %s\n" % (
        sys.version_info[:3] + (os.getpid(), sys.executable))).encode("utf-8")
    try:
        while ready:
            ready = ready[os.write(out_fd, ready):]
    except OSError:
        _fail(92, "the ssh channel closed before the ready line was sent")
    rfile, wfile = os.fdopen(in_fd, "rb"), os.fdopen(out_fd, "wb")
    try:
        code = func(rfile, wfile)
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 93
    code = code if isinstance(code, int) else int(code is not None)
    for stream in (wfile, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    # Normal exit runs atexit handlers, but a stray non-daemon thread must not keep us
    # alive after the channel is gone: hard exit after a grace period.
    timer = threading.Timer(5.0, os._exit, (code,))
    timer.daemon = True
    timer.start()
    sys.exit(code)

_main()
"""


def host_pythons(version: Sequence[int] = tuple(sys.version_info[:2])) -> tuple[str, str]:
    """The interpreters a host is searched for when no ``python`` is given, in order.

    ``python3.X`` of this (the client's) minor version first, because a task pickled by
    value only unpickles under the same minor version (code objects change between them);
    then the host's ``python3``.
    """
    return (f"python{version[0]}.{version[1]}", "python3")


# Runs under sh with the loader line as $0 and host_pythons() as the arguments: exec the first
# interpreter the remote PATH has; 127 (what a shell says for "not found") if none.
_PICK = 'for p; do command -v "$p" >/dev/null 2>&1 && exec "$p" -c "$0"; done; exit 127'


def remote_command(
    python: str | Sequence[str] | None = "python3",
    *,
    min_version: tuple[int, int] = MIN_VERSION,
    memfd: bool = True,
    exec_: bool = True,
    deathsig: bool = True,
) -> str:
    """The command string ssh hands to the remote login shell.

    ssh joins its arguments into one string for the remote shell, so every word is quoted
    here. The Python line is kept on one line without ``'``/``!`` so it survives sh, bash,
    zsh and csh; its version check parses (and fails clearly) even under Python 2. With
    ``python=None``, ``sh`` runs the first of :func:`host_pythons` found on the remote PATH.
    ``exec_=False`` leaves out the leading ``exec``, for a caller that puts words of its own
    before the command (plumbum's ``env K=V ...``: ``env`` can't run the ``exec`` builtin).
    ``deathsig=False`` keeps the loader from dying with its parent (see ``LOADER``).
    """
    words = [] if python is None else [python] if isinstance(python, str) else list(python)
    if python is not None and (not words or not all(words)):
        raise ValueError(f"python must name an interpreter, got {python!r}")
    payload = b2a_base64(zlib.compress(LOADER.encode("utf-8"), 9), newline=False).decode()
    line = (
        "import sys;sys.path[:]=[p for p in sys.path if p];"
        f"M={int(memfd)};D={int(deathsig)};V=({min_version[0]},{min_version[1]});"
        "sys.version_info[:2]>=V or ("
        'sys.stderr.write("rpycsvc-loader: Python %s at %s is too old, need >= %d.%d\\n"'
        f"%(sys.version.split()[0],sys.executable,V[0],V[1])),sys.exit({EXIT_TOO_OLD}));"
        f'import zlib,binascii;exec(zlib.decompress(binascii.a2b_base64("{payload}")))'
    )
    assert not set(line) & set("'!\n"), "the loader line must stay shell-neutral"
    prefix = ["exec"] if exec_ else []
    if python is None:
        return " ".join([*prefix, "sh", "-c", shlex.quote(_PICK), shlex.quote(line),
                         *host_pythons()])
    return " ".join([*prefix, *map(shlex.quote, words), "-c", shlex.quote(line)])


def build_bundle(packages: Sequence[str]) -> bytes:
    """A deterministic zip of the named pure-Python packages/modules, cached per process.

    Names are resolved in this interpreter; a dotted module also brings its parents'
    ``__init__.py``. Byte code for this interpreter's version rides along (used remotely
    only by the same Python version); compiled extensions are refused (``ConfigError``)
    because they can't be imported from memory.
    """
    return _build_bundle(tuple(packages))


@functools.cache
def _build_bundle(names: tuple[str, ...]) -> bytes:
    files: dict[str, Path] = {}
    for name in names:
        files.update(_package_files(name))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for arcname in sorted(files):
            source = files[arcname].read_bytes()
            _add(zf, arcname, source)
            if arcname.endswith(".py"):
                pyc = _bytecode(source, arcname)
                if pyc is not None:
                    _add(zf, arcname + "c", pyc)
    return out.getvalue()


def _add(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
    zf.writestr(info, data, compresslevel=6)


def _bytecode(source: bytes, arcname: str) -> bytes | None:
    """An unchecked hash-based .pyc (PEP 552) beside each module, so every remote process
    (server and workers) skips compiling the bundle. zipimport uses it only when the magic
    number matches the remote Python's; otherwise it compiles the .py as before."""
    import marshal

    try:
        code = compile(source, arcname, "exec", dont_inherit=True)
    except SyntaxError:
        return None
    flags = (0b01).to_bytes(4, "little")  # hash-based, source not checked
    return (importlib.util.MAGIC_NUMBER + flags + importlib.util.source_hash(source)
            + marshal.dumps(code))


def _package_files(name: str) -> dict[str, Path]:
    from rpycsvc.errors import ConfigError

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot bundle {name!r}: {exc}") from exc
    if spec is None:
        raise ConfigError(f"cannot bundle {name!r}: no such module or package here")
    files: dict[str, Path] = {}
    parts = name.split(".")
    for i in range(1, len(parts)):  # the parents of a dotted name must import too
        parent = importlib.util.find_spec(".".join(parts[:i]))
        if parent and parent.origin and parent.origin.endswith("__init__.py"):
            files["/".join(parts[:i]) + "/__init__.py"] = Path(parent.origin)
    base = "/".join(parts)
    if spec.origin and spec.origin.endswith(".py") and not spec.submodule_search_locations:
        return {**files, base + ".py": Path(spec.origin)}
    if not spec.submodule_search_locations:
        raise ConfigError(f"cannot bundle {name!r}: not pure Python (origin {spec.origin!r})")
    for root in map(Path, spec.submodule_search_locations):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and d[0] != "."]
            for path in (Path(dirpath, f) for f in filenames if f[0] != "."):
                if path.suffix in (".so", ".pyd", ".dylib"):
                    raise ConfigError(f"cannot bundle {name!r}: {path} is a compiled extension")
                if path.suffix not in (".pyc", ".pyo"):
                    files[f"{base}/{path.relative_to(root).as_posix()}"] = path
    return files


class RemoteEntry:
    """A started remote entry point, over whatever carries its bytes (see the subclasses).

    ``remote_pid``, ``python_version`` and ``python_executable`` come from the ready line.
    ``close()`` (or leaving ``with``) ends the remote side by EOF, then ends the carrier.
    Subclasses provide the byte primitives: ``fileno``/``recv`` (the entry's output; the fd
    is readable when bytes or EOF wait), ``sendall``, ``_recv_stderr``, ``_close_input``,
    ``_wait``, ``kill``, ``exit_status``, ``_release`` and ``stream`` (an RPyC stream).
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self.remote_pid, self.python_version, self.python_executable = 0, "", ""
        self._stderr = bytearray()
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._collect, daemon=True)

    # -- primitives ---------------------------------------------------------------------------
    def fileno(self) -> int:
        raise NotImplementedError

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes the entry wrote (b"" at EOF); blocks until some arrive."""
        raise NotImplementedError

    def sendall(self, data: bytes) -> None:
        raise NotImplementedError

    def _recv_stderr(self, n: int) -> bytes:
        raise NotImplementedError

    def _close_input(self) -> None:
        raise NotImplementedError

    def _wait(self, timeout: float) -> bool:
        """True once the carrier ended within ``timeout`` seconds."""
        raise NotImplementedError

    def kill(self) -> None:
        """End the carrier now (the remote side then reads EOF)."""
        raise NotImplementedError

    def exit_status(self) -> int | None:
        """The remote command's exit status once known (255: ssh failed), else None."""
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def stream(self) -> Any:
        """An RPyC stream over the channel, for after the ready line."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def _collect(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            while chunk := self._recv_stderr(65536):
                with self._lock:
                    self._stderr += chunk
                    del self._stderr[:-_STDERR_KEEP]

    def stderr_text(self) -> str:
        """What the remote side (and ssh) wrote to stderr so far: the last 64 KiB."""
        with self._lock:
            return self._stderr.decode("utf-8", "replace")

    def close(self, timeout: float = 5.0) -> int | None:
        """Send EOF, let the remote entry exit (bounded), then end the carrier. Returns the
        exit status."""
        if self._closed:
            return self.exit_status()
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError, EOFError):
            self._close_input()
        # Keep reading meanwhile: a carrier blocked on a full pipe or window would never end.
        with selectors.DefaultSelector() as sel, contextlib.suppress(OSError, ValueError):
            sel.register(self.fileno(), selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0 and sel.select(left):
                if not self.recv(65536):
                    break
        self._reap(max(0.0, deadline - time.monotonic()))
        return self.exit_status()

    def _reap(self, timeout: float) -> None:
        if not self._wait(timeout):
            with contextlib.suppress(OSError):
                self.kill()
            self._wait(5.0)
        self._reader.join(2.0)
        self._closed = True
        self._release()

    def __enter__(self) -> RemoteEntry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteProcess(RemoteEntry):
    """An entry point run by a local process whose pipes carry it: ``ssh`` (a host string or
    plumbum's ``SshMachine``) or the server itself (``plumbum.local``). ``stdin``/``stdout``
    are the binary (buffered) channel; ``pid`` is the local process.
    """

    def __init__(self, proc: subprocess.Popen[bytes], host: str) -> None:
        super().__init__(host)
        assert proc.stdin and proc.stdout and proc.stderr
        self.proc, self.pid = proc, proc.pid
        self.stdin: IO[bytes] = proc.stdin
        self.stdout: IO[bytes] = proc.stdout
        self._stderr_pipe: IO[bytes] = proc.stderr
        self._reader.start()

    def fileno(self) -> int:
        return self.stdout.fileno()

    def recv(self, n: int) -> bytes:
        return os.read(self.stdout.fileno(), n)

    def sendall(self, data: bytes) -> None:
        self.stdin.write(data)
        self.stdin.flush()

    def _recv_stderr(self, n: int) -> bytes:
        return os.read(self._stderr_pipe.fileno(), n)

    def _close_input(self) -> None:
        self.stdin.close()

    def _wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        self.proc.kill()

    def exit_status(self) -> int | None:
        return self.proc.poll()

    def _release(self) -> None:
        for pipe in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                pipe.close()

    def stream(self) -> Any:
        # linear-time writes, and `last_activity` for the client's liveness check
        from rpycsvc.protocol.pipes import FastPipeStream

        return FastPipeStream(self.stdout, self.stdin)


class RemoteChannel(RemoteEntry):
    """An entry point over one SSH channel of a connection we don't own (paramiko's
    ``Channel``, from plumbum's ``ParamikoMachine``). The channel is socket-like: its
    ``fileno()`` is readable when data or EOF wait, and RPyC's own ``SocketStream`` runs over
    it (as RPyC's zero-deploy does). ``owner`` is kept alive with it: plumbum's popen object,
    whose file objects would shut the channel's input when collected. Ending the channel
    (``kill``) never closes the connection: that belongs to the machine.
    """

    pid = None

    def __init__(self, channel: Any, host: str, owner: object = None) -> None:
        super().__init__(host)
        self.channel, self._owner = channel, owner
        self._reader.start()

    def fileno(self) -> int:
        return int(self.channel.fileno())

    def recv(self, n: int) -> bytes:
        return bytes(self.channel.recv(n))

    def sendall(self, data: bytes) -> None:
        if self.channel.closed:
            raise OSError("the ssh channel is closed")
        self.channel.sendall(data)

    def _recv_stderr(self, n: int) -> bytes:
        return bytes(self.channel.recv_stderr(n))

    def _close_input(self) -> None:
        self.channel.shutdown_write()

    def _wait(self, timeout: float) -> bool:
        # the exit status arrives before the channel closes; a closed channel sends none
        deadline = time.monotonic() + timeout
        while not self.channel.exit_status_ready() and not self.channel.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.channel.status_event.wait(min(left, 0.1))
        return True

    def kill(self) -> None:
        self.channel.close()

    def exit_status(self) -> int | None:
        if self.channel.exit_status_ready():
            return int(self.channel.recv_exit_status())
        return 255 if self.channel.closed else None

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            self.channel.close()

    def stream(self) -> Any:
        # linear-time writes, and `last_activity` for the client's liveness check
        from rpycsvc.protocol.pipes import ChannelStream

        return ChannelStream(self.channel)


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
            remote._reap(5.0)  # after EOF on its output, the carrier is on its way out anyway
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
