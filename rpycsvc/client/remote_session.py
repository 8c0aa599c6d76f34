"""A Python session in a process of its own on a server: the engine of ``rpycsvc repl``.

Why a process: Ctrl-C must stop a statement blocked in C (``time.sleep``, a socket read,
``subprocess.run``) as it does locally, and only a SIGINT to a process's main thread does
that. So each session is a child process of the server that owns its namespace and runs
statements in its main thread; an interrupt is a SIGINT to its process group (as a
terminal sends one to its foreground group).

Three parts (client and server run the same rpycsvc: the handshake checks):

* :class:`RemoteSession` (client): ``start`` / ``events`` / ``interrupt`` / ``answer_input``
  / ``complete`` / ``close``, and :meth:`RemoteSession.run`, which runs source to the end
  with output streamed to a callback. It needs a *classic* connection.
* :class:`SessionHost` (server, made through ``conn.modules``): spawns the child, relays
  its output and requests, and stops its process group when closed, when its connection
  closes, or when the client drops it. Nothing it returns is a netref.
* :func:`rpycsvc.client.session_child.child_main` (the session process): reads commands from a
  pipe; its descriptors 1 and 2 are pipes to the host, so prints *and* what programs it
  starts print show in the session; ``input()`` and ``sys.stdin`` ask the client for a
  line. It dies when the host's end of its command pipe closes, or when the server dies.

Events (tuples): ``("ready", pid)``, ``("out", fd, text)``, ``("input", prompt)``,
``("done", outcome)`` with outcome ``"ok"``/``"error"``/``"interrupted"``, and
``("exit", status)`` when the process ended (its namespace is gone).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, Callable, Optional

#: Output the host keeps for the client before it stops reading the session's pipes (the
#: session's prints then wait: backpressure, not memory growth).
MAX_BUFFER = 1 << 20
#: Seconds the client waits for events per round trip while a statement runs.
POLL = 0.1
#: Input replies: a line, end of file (Ctrl-D), Ctrl-C, or no terminal to read from.
INPUT_KINDS = ("line", "eof", "interrupt", "unavailable")

Event = tuple  # ("out", fd, text) | ("input", prompt) | ("done", outcome) | ("exit", status) | ...


class SessionError(RuntimeError):
    """The session process could not start, or ended (its namespace is gone)."""


# =============================================================================================
# Client side
# =============================================================================================
class RemoteSession:
    """A session process on the server behind ``conn`` (an RPyC classic connection).

    Not thread-safe (one RPyC connection serves one request at a time): call it from one
    thread; Ctrl-C handling is the caller's, through ``should_interrupt`` of :meth:`run`.
    """

    def __init__(self, conn: Any, *, timeout: float = 30.0) -> None:
        host = conn.modules["rpycsvc.client.remote_session"].SessionHost()
        self._host = host  # keep: dropping the netref stops the session on the server
        self._start, self._events = host.start, host.events
        self._interrupt, self._answer = host.interrupt, host.answer_input
        self._complete, self._close = host.complete, host.close
        self.pid: int | None = None
        self.closed = False
        self._backlog: list[Event] = []  # events that came after a statement's "done"
        early: list[Event] = []
        deadline = time.monotonic() + timeout
        while self.pid is None:
            if time.monotonic() > deadline:
                self.close()
                raise SessionError(f"the session process did not start within {timeout:g} s "
                                   "(a loaded server? raise --timeout)")
            for ev in self.events(POLL):
                if ev[0] == "ready":
                    self.pid = int(ev[1])
                elif ev[0] == "exit":
                    text = "".join(e[2] for e in early if e[0] == "out")
                    self.close()
                    raise SessionError(f"the session process exited at start (status {ev[1]})"
                                       + (f":\n{text}" if text else ""))
                else:
                    early.append(ev)

    def start(self, source: str) -> None:
        """Run ``source`` (one interactive input, maybe several statements) in the session."""
        self._start(source)

    def events(self, timeout: float = POLL) -> tuple[Event, ...]:
        """What happened since the last call, waiting up to ``timeout`` s for something."""
        if self._backlog:
            backlog, self._backlog = self._backlog, []
            return tuple(backlog)
        return tuple(tuple(e) for e in self._events(timeout))

    def interrupt(self) -> bool:
        """Send SIGINT to the session's process group; False if nothing was running."""
        return bool(self._interrupt())

    def answer_input(self, kind: str, text: str = "") -> None:
        """Answer an ``("input", prompt)`` event: ``kind`` is one of :data:`INPUT_KINDS`."""
        self._answer(kind, text)

    def complete(self, text: str) -> tuple[str, ...]:
        """Names in the session starting with ``text`` (``()`` while a statement runs)."""
        return tuple(str(w) for w in self._complete(text))

    def run(self, source: str, write: Callable[[int, str], None], *,
            read_line: Optional[Callable[[str], Optional[str]]] = None,
            should_interrupt: Optional[Callable[[], bool]] = None) -> str:
        """Run ``source`` to its end: ``"ok"``, ``"error"`` or ``"interrupted"``.

        ``write(fd, text)`` gets the output (fd 1 or 2) as it comes. ``read_line(prompt)``
        answers ``input()``: a line without its newline, None for end of file; it may raise
        ``KeyboardInterrupt`` (Ctrl-C at the prompt). Without it, ``input()`` in the session
        raises ``EOFError`` saying there is no terminal. ``should_interrupt()`` is asked
        between polls; True sends SIGINT (it may raise to abandon the statement). Raises
        :class:`SessionError` if the session process ends.
        """
        self.start(source)
        while True:
            if should_interrupt is not None and should_interrupt():
                self.interrupt()
            batch = self.events(POLL)
            for i, ev in enumerate(batch):
                kind = ev[0]
                if kind == "out":
                    write(int(ev[1]), str(ev[2]))
                elif kind == "done":
                    # e.g. what a thread printed meanwhile: shown with the next statement
                    self._backlog = list(batch[i + 1:])
                    return str(ev[1])
                elif kind == "exit":
                    self.closed = True
                    raise SessionError(f"the session process ended ({_status(ev[1])}); "
                                       "its variables are gone")
                elif kind == "input":
                    self._read_input(str(ev[1]), read_line)

    def _read_input(self, prompt: str, read_line: Any) -> None:
        if read_line is None:
            self.answer_input("unavailable", "this session has no terminal to read from "
                              "(it was run without read_line)")
            return
        try:
            line = read_line(prompt)
        except KeyboardInterrupt:
            self.answer_input("interrupt")
        except EOFError:
            self.answer_input("eof")
        else:
            self.answer_input("eof" if line is None else "line", line or "")

    def close(self) -> None:
        """Stop the session process and everything in its process group."""
        if not self.closed:
            self.closed = True
            try:
                self._close()
            except Exception:
                pass  # connection gone: the server stopped the session with it

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _status(code: Any) -> str:
    if isinstance(code, int) and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit status {code}"


# =============================================================================================
# Server side (made by the client through conn.modules["rpycsvc.client.remote_session"])
# =============================================================================================
class _HostState:
    """What the relay thread and the finalizer share (never the host: it must be collectable)."""

    def __init__(self, proc: subprocess.Popen[bytes], cmd: Any, evt: Any, conn: Any) -> None:
        self.proc, self.cmd, self.evt, self.conn = proc, cmd, evt, conn
        self.cond = threading.Condition()
        self.events: list[Any] = []
        self.buffered = 0
        self.running = False
        #: the session armed its SIGINT handler for the running statement; before that an
        #: interrupt waits (a SIGINT then would be taken for a late one and dropped)
        self.started = False
        self.pending_interrupt = False
        self.completions: tuple[str, ...] | None = None
        self.stopped = False

    def push(self, ev: Any, size: int = 0) -> None:
        with self.cond:
            if ev[0] == "out" and self.events and self.events[-1][0] == "out" \
                    and self.events[-1][1] == ev[1]:
                self.events[-1] = ("out", ev[1], self.events[-1][2] + ev[2])
            else:
                self.events.append(ev)
            self.buffered += size
            self.cond.notify_all()

    def stop(self) -> None:
        """Kill the session's process group; close our ends of its pipes."""
        with self.cond:
            if self.stopped:
                return
            self.stopped = True
            self.cond.notify_all()
        _kill_group(self.proc)
        for c in (self.cmd, self.evt):
            try:
                c.close()
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _sigint(s: _HostState) -> bool:
    try:
        os.killpg(s.proc.pid, signal.SIGINT)  # the group, as a terminal's Ctrl-C does
    except OSError:
        return False
    return True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session leads a group of its own
    except OSError:
        try:
            if proc.returncode is None:
                proc.kill()
        except OSError:
            pass


class SessionHost:
    """Server side of a session: the child process and the relay of its output."""

    def __init__(self) -> None:
        from multiprocessing.connection import Connection

        conn = None
        try:  # the rpycsvc connection this request came on: the session dies with it
            from rpycsvc.protocol.rpyc_connection import CURRENT

            conn = getattr(CURRENT, "conn", None)
        except ImportError:
            pass
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        # the folder holding the rpycsvc package (this file is rpycsvc/client/...): the
        # session process imports rpycsvc from there, as this server did
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        boot = (f"__import__('sys').path.append({here!r}); "
                "__import__('rpycsvc.client.session_child', fromlist=['_']).child_main()")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-u", "-c", boot, str(cmd_r), str(evt_w), here],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(cmd_r, evt_w), start_new_session=True, close_fds=True)
        except BaseException:
            for fd in (cmd_r, cmd_w, evt_r, evt_w):
                os.close(fd)
            raise
        os.close(cmd_r)
        os.close(evt_w)
        self._state = state = _HostState(proc, Connection(cmd_w, readable=False),
                                         Connection(evt_r, writable=False), conn)
        self.pid = proc.pid
        weakref.finalize(self, state.stop)
        threading.Thread(target=_relay, args=(state,), name=f"rpycsvc-session-{proc.pid}",
                         daemon=True).start()

    def start(self, source: str) -> None:
        s = self._state
        with s.cond:
            if s.stopped:
                raise SessionError("the session is closed")
            if s.running:
                raise SessionError("a statement is still running in this session")
            s.running, s.started, s.pending_interrupt = True, False, False
        s.cmd.send(("run", str(source)))

    def events(self, timeout: float) -> tuple[Any, ...]:
        s = self._state
        with s.cond:
            if not s.events:
                s.cond.wait(min(float(timeout), 5.0))
            out, s.events, s.buffered = s.events, [], 0
            s.cond.notify_all()
        return tuple(out)

    def interrupt(self) -> bool:
        s = self._state
        with s.cond:
            if not s.running or s.stopped:
                return False
            if not s.started:
                s.pending_interrupt = True  # sent when the session says it started
                return True
        return _sigint(s)

    def answer_input(self, kind: str, text: str = "") -> None:
        if kind not in INPUT_KINDS:
            raise ValueError(f"input answer kind {kind!r}: expected one of {INPUT_KINDS}")
        self._state.cmd.send(("input", str(kind), str(text)))

    def complete(self, text: str) -> tuple[str, ...]:
        s = self._state
        with s.cond:
            if s.running or s.stopped:
                return ()
            s.completions = None
        s.cmd.send(("complete", str(text)))
        deadline = time.monotonic() + 5.0
        with s.cond:
            while s.completions is None and not s.stopped and time.monotonic() < deadline:
                s.cond.wait(0.1)
            return s.completions or ()

    def close(self) -> None:
        self._state.stop()


def _relay(s: _HostState) -> None:
    """Move the session's output and messages into ``s.events`` until it ends or is stopped."""
    import codecs
    import selectors

    out, err = s.proc.stdout, s.proc.stderr
    assert out is not None and err is not None
    pipes = {out.fileno(): 1, err.fileno(): 2}
    decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in pipes}
    for fd in pipes:
        os.set_blocking(fd, False)
    sel = selectors.DefaultSelector()
    for fd in pipes:
        sel.register(fd, selectors.EVENT_READ)
    sel.register(s.evt.fileno(), selectors.EVENT_READ)

    def read_pipe(fd: int) -> bool:
        if fd not in sel.get_map():  # at its end already (one select can report it twice)
            return False
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            sel.unregister(fd)
            return False
        s.push(("out", pipes[fd], decoders[fd].decode(data)), len(data))
        return True

    def drain() -> None:
        # What is in the pipes was written before the message that came (a writer blocks
        # on a full pipe, so that is at most a pipe's capacity): a few reads move it.
        for pfd in list(pipes):
            for _ in range(64):
                if not read_pipe(pfd):
                    break

    def ended() -> None:
        """The session process is gone: its last words, then its exit status."""
        drain()
        try:
            code: Any = s.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        with s.cond:
            s.running = False
        s.push(("exit", code))

    try:
        while True:
            with s.cond:
                while s.buffered > MAX_BUFFER and not s.stopped and not _conn_closed(s):
                    s.cond.wait(0.5)
                if s.stopped:
                    return
            if _conn_closed(s):
                return
            try:
                ready = sel.select(0.5)
            except (OSError, ValueError):  # our ends were closed: stopped
                return
            if not ready and s.proc.poll() is not None:
                ended()  # (a process it forked holds the message pipe open)
                return
            for key, _ in ready:
                fd = key.fd
                if fd in pipes:
                    read_pipe(fd)
                    continue
                # a message: first move what the session printed before sending it
                if fd not in sel.get_map():
                    continue
                drain()
                try:
                    msg = s.evt.recv()
                except (EOFError, OSError):
                    ended()
                    return
                if msg[0] == "completions":
                    with s.cond:
                        s.completions = tuple(msg[1])
                        s.cond.notify_all()
                    continue
                if msg[0] == "started":
                    with s.cond:
                        s.started, pending = True, s.pending_interrupt
                        s.pending_interrupt = False
                    if pending:
                        _sigint(s)
                    continue
                if msg[0] == "done":
                    with s.cond:
                        s.running = False
                s.push(tuple(msg))
    except Exception as exc:  # a bug of ours: say so rather than leave the client waiting
        s.push(("exit", f"unknown (the server's relay of the session failed: {exc!r})"))
        s.stop()
    finally:
        sel.close()
        if _conn_closed(s) or s.stopped:
            s.stop()
        for f in (out, err):
            try:
                f.close()
            except OSError:
                pass


def _conn_closed(s: _HostState) -> bool:
    return s.conn is not None and bool(getattr(s.conn, "closed", False))
