"""The session process of :mod:`rpycsvc.client.remote_session`: a namespace, statements run in
the main thread (so a SIGINT stops one blocked in C), ``input()`` answered by the client.

Started by ``SessionHost`` as ``python -u -c <boot> CMD_FD EVT_FD PATH``; it reads commands
from CMD_FD and sends messages on EVT_FD (``multiprocessing.connection`` framing); its
descriptors 1 and 2 are pipes the host relays. It dies when the host's end of CMD_FD
closes or the server process dies, taking its process group with it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any


class _Child:
    """The session: a namespace, statements run in the main thread, SIGINT handled."""

    def __init__(self, cmd: Any, evt: Any) -> None:
        import __main__

        self.cmd, self.evt = cmd, evt
        self.namespace: dict[str, Any] = __main__.__dict__  # pickle finds REPL functions
        self.count = 0
        self._armed = False
        self.deferred = False  # a SIGINT that came while we were in our own I/O
        self.send_lock = threading.Lock()

    @property
    def armed(self) -> bool:
        """Whether SIGINT raises KeyboardInterrupt now (while a statement runs).

        Armed, the handler is Python's own C one, so a traceback ends at the user's line
        (as locally), not in a handler of ours. Disarmed, a SIGINT is only noted. Main
        thread only (signal handlers are set there).
        """
        return self._armed

    @armed.setter
    def armed(self, on: bool) -> None:
        # the flag says "armed" for as long as a SIGINT may raise: set before arming,
        # cleared after disarming (a SIGINT in between then raises from here)
        if on:
            self._armed = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
        else:
            signal.signal(signal.SIGINT, self._defer)
            self._armed = False

    def _disarm(self) -> None:
        """Disarm, whatever SIGINTs land meanwhile: after this nothing raises."""
        while True:
            try:
                self.armed = False
                return
            except KeyboardInterrupt:
                continue

    def _defer(self, signum: int, frame: Any) -> None:
        self.deferred = True

    def catch_swallowed_interrupts(self) -> None:
        """A Ctrl-C must never be lost. One that lands while Python runs code that can't
        raise (a weakref callback, a ``__del__``; e.g. inside ``import``) is only printed as
        "Exception ignored in ..." and the statement goes on. While armed, such a
        ``KeyboardInterrupt`` is delivered again instead, once that code has returned."""
        previous = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            typ = unraisable.exc_type
            if self._armed and typ is not None and issubclass(typ, KeyboardInterrupt):
                returned = threading.Event()
                threading.Thread(target=_interrupt_after, args=(returned,), daemon=True,
                                 name="rpycsvc-session-reinterrupt").start()
                returned.set()
                return
            previous(unraisable)

        sys.unraisablehook = hook

    def send(self, msg: Any) -> None:
        """Send a message; a Ctrl-C meanwhile waits until it is sent (a half-sent message
        would break the channel)."""
        main = threading.current_thread() is threading.main_thread()
        was = self.armed
        if main and was:
            self.armed = False
        try:
            with self.send_lock:
                self.evt.send(msg)
        finally:
            if main and was:
                self.armed = True
                if self.deferred:
                    self.deferred = False
                    raise KeyboardInterrupt

    def read_line(self, prompt: str) -> str:
        """``input()``: ask the client for a line of its terminal."""
        if threading.current_thread() is not threading.main_thread():
            # the answer comes on the command pipe, which the main thread reads when idle
            raise EOFError("input() in a remote session reads the terminal only in the "
                           "session's main thread (the one running your statements)")
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        self.send(("input", str(prompt)))
        was, self.armed = self.armed, False  # Ctrl-C at that prompt comes as an answer
        try:
            msg = self.cmd.recv()
        finally:
            self.armed = was
        if was and self.deferred:
            self.deferred = False
            raise KeyboardInterrupt
        _, kind, text = msg
        if kind == "interrupt":
            raise KeyboardInterrupt
        if kind == "eof":
            raise EOFError
        if kind == "unavailable":
            raise EOFError(f"input() can't read a line: {text}")
        return str(text)

    def run(self, source: str) -> str:
        self.deferred = False
        outcome = "interrupted"
        try:
            try:
                self.armed = True
                # after arming: the host holds back interrupts until it reads this, so
                # any SIGINT from now on is for this statement (a deferred one raises)
                self.send(("started",))
                outcome = self._run(source)
            finally:
                self._disarm()
        except KeyboardInterrupt:  # landed between the statement's end and disarming
            self._show_exc(KeyboardInterrupt, KeyboardInterrupt(), None)
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
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
                last = ast.Expression(tree.body[-1].value)  # shown, as Python's REPL does
                tree.body.pop()
            code = compile(tree, filename, "exec")
            code_last = compile(last, filename, "eval") if last is not None else None
        except (SyntaxError, OverflowError, ValueError) as exc:
            self._show_exc(type(exc), exc, None)
            return "error"
        try:
            exec(code, self.namespace)
            if code_last is not None:
                sys.displayhook(eval(code_last, self.namespace))
        except KeyboardInterrupt as exc:
            self._show_exc(type(exc), exc, exc.__traceback__)
            return "interrupted"
        except BaseException as exc:  # SystemExit too: leaving is the client's Ctrl-D
            sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, exc.__traceback__
            sys.last_exc = exc  # type: ignore[attr-defined]  # (3.12+: what pdb.pm() reads)
            self._show_exc(type(exc), exc, exc.__traceback__)
            return "error"
        return "ok"

    def _show_exc(self, typ: type[BaseException], exc: BaseException, tb: Any) -> None:
        import traceback

        # from the user's code on, as in Python's REPL (our frame is the first)
        text = "".join(traceback.format_exception(typ, exc, tb.tb_next if tb else None))
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

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


class _TerminalStdin:
    """``sys.stdin`` of a session: each line comes from the client's terminal."""

    encoding = "utf-8"
    errors = "strict"

    def __init__(self, child: _Child) -> None:
        self._child = child

    def readline(self, size: int = -1) -> str:
        try:
            return self._child.read_line("") + "\n"
        except EOFError:
            return ""

    def read(self, size: int = -1) -> str:
        parts: list[str] = []
        while True:
            line = self.readline()
            if not line:
                return "".join(parts)
            parts.append(line)

    def __iter__(self) -> _TerminalStdin:
        return self

    def __next__(self) -> str:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise OSError("a remote session's stdin is the client's terminal: no descriptor")

    def close(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return False


def _interrupt_after(returned: threading.Event) -> None:
    """Interrupt the main thread again once the hook that swallowed its interrupt returned
    (a moment later: raised inside the hook, it would be swallowed again)."""
    import _thread

    returned.wait(5.0)
    time.sleep(0.005)
    _thread.interrupt_main()


def _watch(cmd_fd: int, ppid: int) -> None:
    """Stop the whole session when the host's end of the command pipe closes (connection
    gone, session closed) or the server process dies, even mid-statement."""
    import select

    poller = select.poll()
    poller.register(cmd_fd, select.POLLHUP | select.POLLERR)
    while True:
        hup = any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(500))
        if hup or os.getppid() != ppid:
            try:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            finally:
                os._exit(1)


def child_main() -> None:
    """Entry point of the session process: ``python -u -c <boot> CMD_FD EVT_FD PATH``."""
    import builtins
    from multiprocessing.connection import Connection

    cmd_fd, evt_fd, here = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sys.argv = [""]  # as in Python's own REPL
    if sys.path and sys.path[-1] == here:
        sys.path.pop()
    for fd in (cmd_fd, evt_fd):
        os.set_inheritable(fd, False)  # programs the session starts must not hold them
    ppid = os.getppid()
    cmd, evt = Connection(cmd_fd, writable=False), Connection(evt_fd, readable=False)
    child = _Child(cmd, evt)
    child.armed = False  # installs the handler that only notes a SIGINT
    child.catch_swallowed_interrupts()
    threading.Thread(target=_watch, args=(cmd_fd, ppid), daemon=True,
                     name="rpycsvc-session-watch").start()
    builtins.input = lambda prompt="": child.read_line(str(prompt))
    sys.stdin = _TerminalStdin(child)
    child.send(("ready", os.getpid()))
    while True:
        try:
            msg = cmd.recv()
        except (EOFError, OSError):
            break
        if msg[0] == "run":
            child.send(("done", child.run(msg[1])))
        elif msg[0] == "complete":
            try:
                found = child.complete(msg[1])
            except Exception:
                found = ()
            child.send(("completions", found))
        # an "input" answer with no question pending (the statement ended first): dropped
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(0)
