"""``rpycsvc repl``: an interactive Python prompt whose statements run on a server.

Two halves in one module, so client and server always agree (the handshake checks that
both run the same rpycsvc). On the server, a :class:`RemoteSession` runs each statement
in the connection's own thread, in the classic namespace (``conn.namespace``), and keeps
that connection's prints in a buffer. On the client, :class:`RemoteRepl` reads lines with
readline (history, tab completion of remote names) and, while a statement runs, polls the
buffer over a second *control* connection — which is also how Ctrl-C reaches the server:
the first connection is busy running the statement and reads nothing else meanwhile.

Ctrl-C raises ``KeyboardInterrupt`` in the statement's thread with
``PyThreadState_SetAsyncExc``. That exception is only noticed between bytecodes, so a
statement blocked in one C call (``time.sleep``, a socket read) stops when the call returns.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import rpyc

DESCRIPTION = """\
An interactive Python prompt on an rpycsvc server: every statement runs in the server
process (classic mode), in the same namespace as conn.execute/conn.eval.

  * prints and tracebacks of your statements show here; output of threads you start on
    the server, and of tasks, does not (it goes to the server's own stdout);
  * Tab completes names, keywords, builtins and attributes of remote objects
    (attribute completion evaluates the dotted name on the server, like Python's own);
  * Ctrl-C interrupts the running statement and the session goes on; a statement blocked
    in one C call (time.sleep, a socket read) stops when that call returns; press Ctrl-C
    three times to give up waiting and leave;
  * history is kept in ~/.rpycsvc_history (--history FILE, --no-history);
  * Ctrl-D or exit() leaves. The server must run with classic access (not --no-classic).

SECURITY: you are running code as the server's user; so is anyone else who can connect."""

DEFAULT_HISTORY = "~/.rpycsvc_history"
#: Output a statement may buffer on the server before its prints wait for us to read it.
MAX_BUFFER = 1 << 20
#: Seconds between reads of a running statement's output.
POLL = 0.05

# =============================================================================================
# Server side (imported on the server through conn.modules["rpycsvc.repl"])
# =============================================================================================
_SESSIONS: weakref.WeakValueDictionary[str, RemoteSession] = weakref.WeakValueDictionary()


def _async_exc(tid: int, exc: type[BaseException] | None) -> int:
    import ctypes

    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid),
                                                          None if exc is None
                                                          else ctypes.py_object(exc)))


class _Sink:
    """A server-side ``sys.stdout``/``stderr`` target that buffers for :meth:`drain`.

    Prints never wait on the network, so an interrupt can't land inside RPyC's I/O.
    """

    def __init__(self, session: RemoteSession, fd: int) -> None:
        self.session, self.fd = session, fd

    def write(self, text: str) -> int:
        self.session._emit(self.fd, str(text))
        return len(text)

    def flush(self) -> None:
        pass


class RemoteSession:
    """One REPL session on the server: runs statements, completes names, buffers output."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        import secrets

        from .classic import install
        from .transport import CURRENT

        self.token = secrets.token_hex(16)
        self.namespace = namespace
        self.lock = threading.Lock()  # guards tid/interrupting against interrupt()
        self.tid: int | None = None
        self.interrupting = False
        self.cond = threading.Condition()
        self.out: list[tuple[int, str]] = []
        self.buffered = 0
        self.count = 0
        self.last_traceback: Any = None
        self._conn = getattr(CURRENT, "conn", None)
        #: False when prints can't be routed to this session (not an rpycsvc server thread)
        self.routed = self._conn is not None
        if self._conn is not None:
            for router, fd in zip(install(), (1, 2)):
                router.set(self._conn, _Sink(self, fd))
        _SESSIONS[self.token] = self

    def run(self, source: str) -> str:
        """Run one interactive statement; ``"ok"``, ``"error"`` or ``"interrupted"``."""
        tid = threading.get_ident()
        with self.lock:
            self.tid, self.interrupting = tid, False
        outcome = "interrupted"
        try:
            outcome = self._run(source)
        except KeyboardInterrupt:  # landed outside the statement, before we disarmed
            self._write_exc(KeyboardInterrupt, KeyboardInterrupt(), None)
        finally:
            # At most one interrupt is ever sent per statement (see interrupt()), so once
            # it is cleared under the lock nothing can reach this thread after we return.
            for _ in range(10):
                try:
                    with self.lock:
                        if self.interrupting:
                            _async_exc(tid, None)  # drop one that arrived too late
                        self.tid, self.interrupting = None, False
                    break
                except KeyboardInterrupt:
                    continue
        return outcome

    def _run(self, source: str) -> str:
        import ast
        import linecache

        self.count += 1
        filename = f"<remote-{self.count}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        try:
            tree = ast.parse(source, filename, "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                # a final expression is evaluated apart so its value can be shown (as
                # Python's REPL does, but without the process-wide sys.displayhook)
                last = ast.Expression(tree.body[-1].value)
                tree.body.pop()
            code = compile(tree, filename, "exec")
            code_last = compile(last, filename, "eval") if last is not None else None
        except (SyntaxError, OverflowError, ValueError) as exc:
            self._write_exc(type(exc), exc, None)
            return "error"
        try:
            exec(code, self.namespace)
            if code_last is not None:
                value = eval(code_last, self.namespace)
                if value is not None:
                    self.namespace["_"] = value
                    self._emit(1, repr(value) + "\n")
        except KeyboardInterrupt as exc:
            self._write_exc(type(exc), exc, exc.__traceback__)
            return "interrupted"
        except BaseException as exc:  # SystemExit included: it must not end the server
            self.last_traceback = exc.__traceback__
            self._write_exc(type(exc), exc, exc.__traceback__)
            return "error"
        return "ok"

    def _write_exc(self, typ: type[BaseException], exc: BaseException, tb: Any) -> None:
        import traceback

        # skip our own frame: the traceback starts at the user's code, as in Python's REPL
        lines = traceback.format_exception(typ, exc, tb.tb_next if tb is not None else None)
        self._emit(2, "".join(lines))

    def _emit(self, fd: int, text: str) -> None:
        with self.cond:
            # A full buffer makes the printer wait for the client (bounded: a client that
            # went away must not hang the statement), so a print loop can't eat memory.
            deadline = time.monotonic() + 5.0
            while self.buffered > MAX_BUFFER and time.monotonic() < deadline:
                self.cond.wait(0.1)
            self.out.append((fd, text))
            self.buffered += len(text)

    def drain(self) -> tuple[tuple[int, str], ...]:
        """Output buffered since the last call, as ``(fd, text)`` pairs, merged by fd."""
        with self.cond:
            out, self.out, self.buffered = self.out, [], 0
            self.cond.notify_all()
        merged: list[tuple[int, str]] = []
        for fd, text in out:
            if merged and merged[-1][0] == fd:
                merged[-1] = (fd, merged[-1][1] + text)
            else:
                merged.append((fd, text))
        return tuple(merged)

    def interrupt(self) -> str:
        """Raise KeyboardInterrupt in the running statement: ``"sent"``, ``"pending"`` (sent
        before, not yet noticed: blocked in a C call), or ``"idle"`` (nothing runs)."""
        with self.lock:
            if self.tid is None:
                return "idle"
            if self.interrupting:
                return "pending"
            if _async_exc(self.tid, KeyboardInterrupt) != 1:
                return "idle"
            self.interrupting = True
            return "sent"

    def complete(self, text: str) -> tuple[str, ...]:
        """Names, keywords and builtins starting with ``text``; after a dot, attributes of
        the object the dotted name before it evaluates to (plain names only, no calls)."""
        import builtins
        import keyword
        import re

        if "." in text:
            expr, _, attr = text.rpartition(".")
            if not re.fullmatch(r"[A-Za-z_][\w.]*", expr):
                return ()
            try:
                words = set(dir(eval(expr, self.namespace)))
            except Exception:
                return ()
            hide = not attr.startswith("_")
            found = [f"{expr}.{w}" for w in words
                     if w.startswith(attr) and not (hide and w.startswith("_"))]
        else:
            words = {*keyword.kwlist, *self.namespace, *dir(builtins)}
            found = [w for w in words if w.startswith(text) and not w.startswith("__")]
        return tuple(sorted(found)[:1000])

    def close(self) -> None:
        from .classic import install

        if self._conn is not None:
            for router in install():
                router.set(self._conn, None)
        _SESSIONS.pop(self.token, None)


def control(token: str, op: str) -> Any:
    """For the control connection: ``drain`` or ``interrupt`` the session ``token``."""
    s = _SESSIONS.get(token)
    if s is None:
        return () if op == "drain" else "idle"
    return s.drain() if op == "drain" else s.interrupt()


# =============================================================================================
# Client side
# =============================================================================================
class RemoteRepl:
    """The client of a remote REPL: a session connection plus a control connection."""

    def __init__(self, address: str, *, authkey: str | None = None, timeout: float = 10.0,
                 stdout: Any = None, stderr: Any = None) -> None:
        from .client import connect
        from .errors import ConfigError

        self.stdout, self.stderr = stdout or sys.stdout, stderr or sys.stderr
        with _sigint_to_main_thread_only():
            self.client = connect(address, timeout=timeout, authkey=authkey, output="discard")
            try:
                if not self.client.server_info.get("classic", True):
                    raise ConfigError(f"{self.client.address} runs in service-only mode "
                                      "(--no-classic): it runs no code from clients, so no REPL")
                self.control = connect(address, timeout=timeout, authkey=authkey,
                                       output="discard")
            except BaseException:
                self.client.close()
                raise
        self._busy = False  # a statement we gave up on still runs on self.client
        for c in (self.client, self.control):  # completion and control calls: bounded
            c.conn._config["sync_request_timeout"] = timeout
        conn = self.client.conn
        try:
            # created by a request on *this* connection: that is whose prints it collects
            self.session = conn.modules["rpycsvc.repl"].RemoteSession(conn.namespace)
            self.token = str(self.session.token)
        except BaseException:
            self.control.close()
            self.client.close()
            raise
        self._run = rpyc.async_(self.session.run)  # keep: RPyC caches these weakly
        self._complete = self.session.complete
        self._control = self.control.conn.modules["rpycsvc.repl"].control
        self._matches: list[str] = []

    def execute(self, source: str) -> str:
        """Run ``source`` remotely, showing its output as it comes; Ctrl-C interrupts it.

        Returns ``"ok"``, ``"error"``, ``"interrupted"`` or ``"lost"`` (connection gone or
        abandoned after repeated Ctrl-C).
        """
        import signal

        done, asked = threading.Event(), threading.Event()
        old = None
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C only sets a flag: a KeyboardInterrupt raised inside RPyC's own code
            # could leave a connection half-read.
            old = signal.signal(signal.SIGINT, lambda *_: asked.set())
        pending = 0
        self._busy = True
        try:
            res = self._run(source)
            res.add_callback(lambda _r: done.set())
            while not done.wait(POLL):
                if self.client.closed or self.control.closed:
                    self._show(2, f"\nconnection to {self.client.address} lost\n")
                    return "lost"
                self._show_output()
                if asked.is_set():
                    state = str(self._control(self.token, "interrupt"))
                    if state != "idle":  # idle: not started yet; ask again next round
                        asked.clear()
                    if state == "sent":
                        self._show(1, "\n")
                    if state == "pending":
                        pending += 1
                        if pending >= 3:
                            self._show(2, "\nabandoning the session; the statement keeps "
                                          "running on the server until it returns\n")
                            return "lost"
                        self._show(2, "\n(interrupt already sent: the statement is probably "
                                      "blocked in a C call and stops when it returns; "
                                      f"Ctrl-C {3 - pending} more time(s) to leave)\n")
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        self._busy = False
        self._show_output()
        if res.error:
            self._show(2, f"error from the server: {res.value}\n")
            return "error"
        return str(res.value)

    def _show_output(self) -> None:
        for fd, text in self._control(self.token, "drain"):
            self._show(fd, text)

    def _show(self, fd: int, text: str) -> None:
        (self.stdout if fd == 1 else self.stderr).write(text)
        (self.stdout if fd == 1 else self.stderr).flush()

    def complete(self, text: str, state: int) -> str | None:
        """readline's completer: remote names for ``text``; an indent on an empty line."""
        if state == 0:
            if not text.strip():
                import readline

                readline.insert_text("    ")
                readline.redisplay()
                self._matches = [""]
            else:
                try:
                    self._matches = list(self._complete(text))
                except Exception:  # completion must never end the session
                    self._matches = []
        return self._matches[state] if state < len(self._matches) else None

    def interact(self, history: str | None = DEFAULT_HISTORY) -> int:
        """Read, run remotely, print, until Ctrl-D or ``exit()``. Returns the exit status."""
        import codeop

        histfile = _setup_readline(self, history)
        info = self.client.server_info
        print(f"rpycsvc repl on {self.client.address} (host {info.get('host', '?')}, pid "
              f"{info.get('pid', '?')}). Statements run on the server; Ctrl-C interrupts "
              "one, Ctrl-D leaves.", file=self.stdout, flush=True)
        lines: list[str] = []
        try:
            while True:
                try:
                    line = input("... " if lines else ">>> ")
                except EOFError:
                    print(file=self.stdout)
                    return 0
                except KeyboardInterrupt:
                    print("\nKeyboardInterrupt", file=self.stdout)
                    lines = []
                    continue
                lines.append(line)
                source = "\n".join(lines)
                if len(lines) == 1 and line.strip() in ("exit", "exit()", "quit", "quit()"):
                    return 0
                try:
                    if codeop.compile_command(source, "<remote>", "single") is None:
                        continue  # more lines to come
                except (SyntaxError, OverflowError, ValueError):
                    pass  # the server reports it, with its own Python's wording
                lines = []
                if self.execute(source) == "lost":
                    return 1
        finally:
            if histfile:
                import readline

                try:
                    readline.write_history_file(histfile)
                except OSError:
                    pass

    def close(self) -> None:
        if not self._busy:  # else its connection can't answer before the statement ends
            try:
                self.session.close()
            except Exception:
                pass  # the connection is gone: the server dropped the session with it
        self.control.close()
        self.client.close()

    def __enter__(self) -> RemoteRepl:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def _sigint_to_main_thread_only() -> Iterator[None]:
    """Threads started in this block (the connections' readers) never receive SIGINT.

    The kernel may deliver Ctrl-C's SIGINT to any thread; Python then only flags it, and
    a main thread blocked in readline's select() would not notice until the next key.
    """
    import signal

    if threading.current_thread() is not threading.main_thread() or not hasattr(
            signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield  # new threads inherit the blocked mask
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _setup_readline(repl: RemoteRepl, history: str | None) -> str | None:
    try:
        import readline
    except ImportError:
        return None
    readline.set_completer(repl.complete)
    readline.set_completer_delims(" \t\n`~!@#$%^&*()-=+[{]}\\|;:'\",<>/?")
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    if not history:
        return None
    path = os.path.expanduser(history)
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # first session, or unreadable: start empty
    readline.set_history_length(1000)
    return path


def post_mortem(exc: BaseException, conn: Any = None, *, interactive: bool = False,
                file: Any = None, stdin: Any = None) -> None:
    """Show where a remote call failed: the server's traceback of ``exc``.

    Works for a task's exception (``future.result()`` raised it; its ``remote_traceback``)
    and for a classic call's (``client.eval(...)``, ``client.modules.x.f()``). With
    ``interactive`` and ``conn`` (the client the classic call failed on), also opens
    ``pdb`` *on the server* in the failed frames, reading commands from ``stdin`` (default
    ours) — RPyC keeps only a connection's most recent traceback, so call it right away.
    A task's frames can't be inspected: tasks run in worker processes, which send back
    the traceback's text only.
    """
    out = file or sys.stderr
    text = getattr(exc, "remote_traceback", None) or getattr(exc, "_remote_tb", None)
    where = getattr(exc, "address", None) or getattr(conn, "address", None)
    if not text:
        import traceback

        print(f"{type(exc).__name__} has no remote traceback: it was raised here, not on a "
              "server. Local traceback:", file=out)
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=out)
        return
    print(f"Remote traceback{f' (on {where})' if where else ''}:", file=out)
    print(str(text).rstrip(), file=out)
    if not interactive:
        return
    if conn is None or not getattr(exc, "_remote_tb", None):
        print("(no interactive post-mortem: " + ("pass the client the call failed on)"
              if conn is None else "this failure came from a task, whose frames stayed "
              "in a worker process; reproduce it through classic access to debug it)"),
              file=out)
        return
    raw = getattr(conn, "conn", conn)
    tb = raw.root.getconn()._last_traceback
    debugger = raw.modules.pdb.Pdb(stdin=stdin or sys.stdin, stdout=out)
    debugger.reset()
    debugger.interaction(None, tb)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", metavar="HOST[:PORT]", help="the server (default port 18812)")
    p.add_argument("--authkey", default=None,
                   help="the server's shared secret (prefer RPYCSVC_AUTHKEY)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to connect, and for completion and control calls (default 10)")
    p.add_argument("--history", default=DEFAULT_HISTORY,
                   help=f"history file (default {DEFAULT_HISTORY})")
    p.add_argument("--no-history", dest="history", action="store_const", const=None,
                   help="keep no history")


def run(args: argparse.Namespace) -> int:
    """``rpycsvc repl``: 0 on Ctrl-D/exit(), 1 if the connection was lost."""
    with RemoteRepl(args.address, authkey=args.authkey, timeout=args.timeout) as repl:
        return repl.interact(args.history)
