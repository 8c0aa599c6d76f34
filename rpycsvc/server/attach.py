"""The server's end of attaching: a private Unix socket on the host, reached over ssh.

A server started by :func:`rpycsvc.deploy` speaks to its deploying client over the pipes of
that client's ssh session. To let ``rpycsvc status``, ``top``, ``repl`` or a second script
reach it while it runs, the server also listens on a Unix socket:

- **Where.** A directory made for it with ``mkdtemp`` (mode 0700, owned by the user who
  deployed), in ``$XDG_RUNTIME_DIR`` when that is set (a per-user tmpfs), else the host's
  temp directory: ``<dir>/rpycsvc-XXXXXXXX/server.sock``. Nothing else is written there.
- **Who.** Only processes of the server's own uid: the directory's mode keeps others from
  reaching the socket, and each accepted connection's peer is checked with ``SO_PEERCRED``
  (a process of another uid is dropped before it can send a byte). No authkey: ssh has
  authenticated the user already.
- **How.** Each accepted connection is served exactly as the ssh session is: the same
  runtime and worker pool, a pipe stream (:class:`~rpycsvc.protocol.pipes.FastPipeStream`) and
  :class:`~rpycsvc.protocol.channel.FastChannel`, the same service class; its tasks count as
  ``"ssh"`` in ``stats()["tasks_by_transport"]``.
- **Until when.** The socket and its directory are removed when the server stops: its
  client closes, dies or goes silent (the existing teardown), or it gets SIGTERM/SIGHUP
  (its sshd session ended). Connections attached meanwhile end with it. A server killed
  outright (SIGKILL, a crash) can't clean up: the next server deployed there removes such
  a directory (ours, 0700, holding only a socket over a minute old that refuses
  connections: see :func:`sweep`).

A client attaches with an address ``ssh://[user@]host[:port]/path/to/server.sock`` (what
``cluster[i].server_info["attach"]`` says, and ``deploy`` logs): :func:`connect_attached`
runs ``ssh [options] host exec python3 -c '<FORWARDER>' /path/to/server.sock``. The
forwarder (a few lines of the host's standard library, sent inline: nothing installed)
connects the ssh session's stdin/stdout to the socket, and the client speaks the normal
rpycsvc protocol over those pipes. ssh is run as :func:`rpycsvc.deploy` runs it: your
``~/.ssh/config`` and agent apply, plus ``BatchMode=yes`` and the keepalive options;
``RPYCSVC_SSH_COMMAND`` and ``RPYCSVC_SSH_OPTIONS`` (split like a shell line), or the
``ssh_command``/``ssh_options`` keywords, change them. ``unix:///path`` reaches a socket on
this machine directly (a server deployed on ``plumbum.local``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rpycsvc.attach")

#: The socket's file name inside its private directory.
SOCKET_NAME = "server.sock"
#: The longest path a Unix socket address may hold on Linux (``sun_path`` minus its NUL).
MAX_SOCKET_PATH = 107

# -- the server side ---------------------------------------------------------------------------
def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a connected Unix socket, as
    the kernel recorded them when it connected (Linux ``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_is_owner(sock: socket.socket) -> bool:
    """Whether the peer of ``sock`` runs as this process's own uid (anyone else, root
    included, is refused)."""
    try:
        return peer_credentials(sock)[1] == os.getuid()
    except OSError:
        return False


def socket_base() -> str:
    """Where the private directory goes: ``$XDG_RUNTIME_DIR`` if it is set and a directory,
    else the temp directory (``$TMPDIR``, ``/tmp``...)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK | os.X_OK):
        return runtime
    return tempfile.gettempdir()


class AttachListener:
    """The deployed server's Unix socket, in a private directory; see the module's text.

    :meth:`open` makes the directory and listens; :meth:`start` serves connections with
    the server's runtime; :meth:`close` (also at exit, and on SIGTERM/SIGHUP when opened in
    the main thread) removes the socket and the directory and ends attached connections.
    """

    def __init__(self, directory: str, sock: socket.socket) -> None:
        self.directory = directory
        self.path = os.path.join(directory, SOCKET_NAME)
        self._sock = sock
        # (re-entrant: close() may run in a signal handler while this thread is in close())
        self._lock = threading.RLock()
        self._closed = False
        self._conns: set[socket.socket] = set()
        self.refused = 0  # connections dropped because their uid was not ours

    @classmethod
    def open(cls, base: str | None = None) -> AttachListener:
        """A listening socket at ``<base>/rpycsvc-XXXXXXXX/server.sock`` (``base``: see
        :func:`socket_base`; the temp directory if the path would be too long)."""
        if not hasattr(socket, "AF_UNIX") or not hasattr(socket, "SO_PEERCRED"):
            raise OSError("this system has no Unix sockets with SO_PEERCRED (Linux only)")
        bases = [base or socket_base(), tempfile.gettempdir(), "/tmp"]
        for where in dict.fromkeys(bases):
            # mkdtemp name + "/server.sock": 8 random characters after "rpycsvc-"
            if len(os.path.join(where, "rpycsvc-XXXXXXXX", SOCKET_NAME)) <= MAX_SOCKET_PATH:
                break
        else:
            raise OSError(f"no directory with a path short enough for a Unix socket: {bases}")
        sweep(where)
        directory = tempfile.mkdtemp(prefix="rpycsvc-", dir=where)  # mode 0700, ours
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.path.join(directory, SOCKET_NAME))
            sock.listen(16)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, SOCKET_NAME))
            os.rmdir(directory)
            raise
        listener = cls(directory, sock)
        listener._install_cleanup()
        return listener

    def _install_cleanup(self) -> None:
        atexit.register(self.close)
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(signum)

            def handler(num: int, frame: Any, previous: Any = previous) -> None:
                # remove the socket first, then die as we would have (or call theirs)
                self.close()
                if callable(previous):
                    previous(num, frame)
                else:
                    signal.signal(num, signal.SIG_DFL)
                    os.kill(os.getpid(), num)

            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, handler)

    def start(self, serve: Callable[[socket.socket], None]) -> None:
        """Accept connections in a daemon thread; ``serve(sock)`` runs in a thread of its
        own for each one whose peer runs as our uid (others are closed at once)."""
        threading.Thread(target=self._accept_loop, args=(serve,), name="rpycsvc-attach",
                         daemon=True).start()

    def _accept_loop(self, serve: Callable[[socket.socket], None]) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.1)  # (EMFILE and the like: the listener itself is fine)
                continue
            if not peer_is_owner(conn):
                self.refused += 1
                try:
                    pid, uid, _gid = peer_credentials(conn)
                    who = f"pid {pid}, uid {uid}"
                except OSError:
                    who = "unknown peer"
                log.warning("refused an attach from %s: only uid %d may use this server",
                            who, os.getuid())
                conn.close()
                continue
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve_one, args=(serve, conn),
                             name="rpycsvc-attached", daemon=True).start()

    def _serve_one(self, serve: Callable[[socket.socket], None], conn: socket.socket) -> None:
        try:
            serve(conn)
        except Exception as exc:  # one attached client's trouble is its own
            log.warning("attached connection ended: %s: %s", type(exc).__name__, exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        """Stop listening, end attached connections, remove the socket and its directory.
        Every step is idempotent and runs again on a second call, so a signal handler that
        interrupts a close() in progress still removes everything before we die."""
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        for s in [self._sock, *conns]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes threads blocked reading them
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)

    @property
    def closed(self) -> bool:
        return self._closed


#: A socket this old (seconds since its bind) that refuses connections is a dead server's.
STALE_AFTER = 60.0


def sweep(base: str) -> list[str]:
    """Remove what servers killed outright (SIGKILL, a crash: no clean-up ran) left in
    ``base``: directories ``rpycsvc-*`` of our uid, mode 0700, holding nothing but a
    ``server.sock`` bound over :data:`STALE_AFTER` seconds ago that refuses connections (no
    process listens on it any more). A live server's socket accepts, so it is never
    touched. Returns the directories removed."""
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(base) if n.startswith("rpycsvc-")]
    except OSError:
        return removed
    for name in names:
        directory = os.path.join(base, name)
        path = os.path.join(directory, SOCKET_NAME)
        try:
            info = os.lstat(directory)
            if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
                    or stat.S_IMODE(info.st_mode) != 0o700
                    or os.listdir(directory) != [SOCKET_NAME]):
                continue
            sock_info = os.lstat(path)
            if (not stat.S_ISSOCK(sock_info.st_mode) or sock_info.st_uid != os.getuid()
                    or time.time() - sock_info.st_mtime < STALE_AFTER):
                continue
        except OSError:
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except ConnectionRefusedError:
            with contextlib.suppress(OSError):
                os.unlink(path)
                os.rmdir(directory)
                removed.append(directory)
        except OSError:
            pass
        finally:
            probe.close()
    if removed:
        log.info("removed the sockets of servers that were killed: %s", ", ".join(removed))
    return removed


def open_listener() -> AttachListener | None:
    """The deployed server's listener, or None (logged) where it can't be made: the server
    then serves its deploying client alone, as before."""
    try:
        return AttachListener.open()
    except OSError as exc:
        log.warning("no attach socket (other clients can't reach this server): %s", exc)
        return None


def serve_attached(sock: socket.socket, runtime: Any, service_type: type,
                   max_message: int) -> None:
    """Serve one attached connection until it ends, as :func:`rpycsvc.server.stdio.serve_stdio`
    serves the ssh session: a pipe stream over the socket's descriptor, a FastChannel
    trusted with full-size messages (the peer is our own uid, behind ssh), and a new
    instance of ``service_type`` over ``runtime``."""
    from rpycsvc.protocol.channel import FastChannel
    from rpycsvc.protocol.pipes import FastPipeStream
    from rpycsvc.protocol.rpyc_connection import PROTOCOL_CONFIG

    pid = peer_credentials(sock)[0]
    rfile = os.fdopen(os.dup(sock.fileno()), "rb", buffering=0)
    wfile = os.fdopen(os.dup(sock.fileno()), "wb", buffering=0)
    stream = FastPipeStream(rfile, wfile)
    channel = FastChannel(stream, limit=max_message)
    config = dict(PROTOCOL_CONFIG, endpoints=(None, ("attached", pid)))
    log.info("attached connection from pid %d", pid)
    conn = service_type(runtime)._connect(channel, config)
    try:
        conn.serve_all()
    except (EOFError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            conn.close()
        log.info("attached connection from pid %d closed", pid)
