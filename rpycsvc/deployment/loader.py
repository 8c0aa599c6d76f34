"""The remote loader: the ``python -c`` line ssh runs on a host, what it unpacks, its exit codes.

The line (:func:`remote_command`) checks the Python version and runs ``LOADER``, which reads
a zip of our pure-Python packages (:mod:`rpycsvc.deployment.bundle`) from stdin, imports it
from memory (a ``memfd`` served to zipimport, else a meta-path importer), answers one
``RPYCSVC-READY`` line and hands the ssh pipes to an entry point ``"module:function"``.

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

import shlex
import sys
import zlib
from binascii import b2a_base64
from collections.abc import Sequence

EXIT_TOO_OLD = 90
EXIT_IMPORT = 91
EXIT_FRAMING = 92
EXIT_ENTRY_RAISED = 93
READY_MARKER = b"RPYCSVC-READY "
MIN_VERSION = (3, 9)

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
