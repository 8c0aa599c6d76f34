"""``rpycsvc repl``: an interactive Python prompt whose statements run on a server.

Each REPL has a session process of its own on the server (:mod:`rpycsvc.client.remote_session`):
it owns the namespace, runs statements in its main thread, and prints to pipes the server
relays to us. So Ctrl-C is a real SIGINT there and stops a statement blocked in C
(``time.sleep``, a socket read, ``subprocess.run``) as it does locally, and ``input()``
reads a line from our terminal. The client here reads lines with readline (history, tab
completion of the session's names) and polls the session while a statement runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from rpycsvc.client.remote_session import RemoteSession, SessionError

DESCRIPTION = """\
An interactive Python prompt on an rpycsvc server. The session is a Python process of its
own on the server (a child of the server, started for this REPL and stopped when you
leave): its own namespace and modules, the server's machine, user, cwd and environment.
It does not share variables with the server process (conn.execute/conn.eval, hosted
objects).

  * prints and tracebacks show here, and so does what programs the session starts print;
    input() and sys.stdin read from this terminal;
  * Tab completes names, keywords, builtins and attributes of the session's objects
    (attribute completion evaluates the dotted name in the session, like Python's own);
  * Ctrl-C interrupts the running statement, also one blocked in C (time.sleep, a socket
    read, subprocess.run), and the session goes on; if a statement ignores it, the fourth
    Ctrl-C stops the session and leaves;
  * history is kept in ~/.rpycsvc_history (--history FILE, --no-history);
  * Ctrl-D or exit() leaves. The server must run with classic access (not --no-classic).

SECURITY: you are running code as the server's user; so is anyone else who can connect."""

DEFAULT_HISTORY = "~/.rpycsvc_history"
#: Ctrl-C presses while a statement runs after which the REPL stops the session and leaves.
GIVE_UP = 4


class _Abandon(Exception):
    """The user pressed Ctrl-C :data:`GIVE_UP` times: the statement ignores SIGINT."""


class RemoteRepl:
    """The client of a remote REPL: a connection and a session process behind it."""

    def __init__(self, address: str, *, authkey: str | None = None, timeout: float = 10.0,
                 stdout: Any = None, stderr: Any = None, stdin: Any = None) -> None:
        from rpycsvc.client.connect import connect
        from rpycsvc.errors import ConfigError

        self.stdout, self.stderr = stdout or sys.stdout, stderr or sys.stderr
        self.stdin = stdin  # None: our terminal (readline), for input() in the session
        with _sigint_to_main_thread_only():
            self.client = connect(address, timeout=timeout, authkey=authkey, output="discard")
        try:
            if not self.client.server_info.get("classic", True):
                raise ConfigError(f"{self.client.address} runs in service-only mode "
                                  "(--no-classic): it runs no code from clients, so no REPL")
            # every call on the session is short (a poll waits POLL): bounded
            self.client.conn._config["sync_request_timeout"] = max(timeout, 10.0)
            self.session = RemoteSession(self.client.conn, timeout=max(timeout, 30.0))
        except BaseException:
            self.client.close()
            raise
        self._complete = self.session.complete
        self._matches: list[str] = []

    def execute(self, source: str) -> str:
        """Run ``source`` remotely, showing its output as it comes; Ctrl-C interrupts it.

        Returns ``"ok"``, ``"error"``, ``"interrupted"`` or ``"lost"`` (connection or
        session process gone, or the session stopped after :data:`GIVE_UP` Ctrl-Cs).
        """
        asked = threading.Event()
        presses = 0

        def should_interrupt() -> bool:
            nonlocal presses
            if not asked.is_set():
                return False
            asked.clear()
            presses += 1
            if presses >= GIVE_UP:
                raise _Abandon
            if presses > 1:
                self._show(2, f"\n(the statement goes on: it ignores Ctrl-C; Ctrl-C "
                              f"{GIVE_UP - presses} more time(s) to stop the session and "
                              "leave)\n")
            return True

        old = None
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C only sets a flag: a KeyboardInterrupt raised inside RPyC's own code
            # could leave the connection half-read.
            old = signal.signal(signal.SIGINT, lambda *_: asked.set())
        try:
            return self.session.run(source, self._show, read_line=self._read_line,
                                    should_interrupt=should_interrupt)
        except _Abandon:
            self._show(2, "\nstopping the session (its variables are lost) and leaving\n")
            self.session.close()
            return "lost"
        except SessionError as exc:
            self._show(2, f"\n{exc}\n")
            return "lost"
        except (EOFError, OSError) as exc:  # RPyC: connection closed, or no reply in time
            self._show(2, f"\nconnection to {self.client.address} lost "
                          f"({type(exc).__name__}: {exc})\n")
            return "lost"
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)

    def _read_line(self, prompt: str) -> str | None:
        """A line for ``input()`` in the session: from our terminal, Ctrl-C and Ctrl-D as
        locally (``KeyboardInterrupt``, ``EOFError``)."""
        if self.stdin is not None:
            self._show(1, prompt)
            line = self.stdin.readline()
            return line.rstrip("\n") if line else None
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
        try:
            return input(prompt)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)

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
        print(f"rpycsvc repl on {self.client.address} (host {info.get('host', '?')}, "
              f"session pid {self.session.pid}). Statements run on the server; Ctrl-C "
              "interrupts one, Ctrl-D leaves.", file=self.stdout, flush=True)
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
        """Stop the session process (and what it started), then close the connection."""
        try:
            self.session.close()
        finally:
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
                   help="the server's shared secret (default: $RPYCSVC_AUTHKEY, else none; "
                        "prefer the variable: arguments show in ps)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to connect, and for each call to the server (default 10; "
                        "the session process gets at least 30 to start)")
    p.add_argument("--history", default=DEFAULT_HISTORY,
                   help=f"history file (default {DEFAULT_HISTORY})")
    p.add_argument("--no-history", dest="history", action="store_const", const=None,
                   help="keep no history (default: keep it in --history)")


def run(args: argparse.Namespace) -> int:
    """``rpycsvc repl``: 0 on Ctrl-D/exit(), 1 if the connection was lost."""
    with RemoteRepl(args.address, authkey=args.authkey, timeout=args.timeout) as repl:
        return repl.interact(args.history)
