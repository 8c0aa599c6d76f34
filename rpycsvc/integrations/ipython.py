"""IPython and Jupyter magics: ``%load_ext rpycsvc``.

* ``%rpycsvc connect HOST[:PORT]... [--authkey KEY] [--name NAME]`` connects a
  :class:`~rpycsvc.Cluster` and puts it in the namespace as ``cluster`` (or NAME);
  ``%rpycsvc local [N]`` starts N servers on this machine instead; ``%rpycsvc`` shows the
  cluster (an HTML card in Jupyter); ``%rpycsvc close`` closes it.
* ``%%remote [SERVER]`` runs the cell on one server (the first, or SERVER: an index or
  ``host:port``) in a Python session of its own there, through classic access. Its prints
  stream into the cell as they come; its variables stay for the next ``%%remote`` cell.
  The kernel's interrupt (or Ctrl-C in a terminal IPython) stops the cell there, also when
  it is blocked in C, as ``rpycsvc repl``'s Ctrl-C does: the session is a process of its own
  (:mod:`rpycsvc.client.remote_session`) and the interrupt is a SIGINT to it.
* ``%%broadcast`` runs the cell on every server at once (ipyparallel's ``%%px``), each in
  its own session; every line of output is prefixed with its server's address.

The session of a server is shared by ``%%remote`` and ``%%broadcast``; it is separate from
the server process's own namespace (``client.execute``) and from tasks' workers.
"""

from __future__ import annotations

import atexit
import contextlib
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from rpycsvc.client import output
from rpycsvc.client.cluster import Cluster
from rpycsvc.client.remote_session import RemoteSession, SessionError
from rpycsvc.errors import RpycsvcError

#: Interrupts of one cell after which its sessions are stopped (the cell ignores SIGINT),
#: as ``rpycsvc repl`` gives up after as many Ctrl-Cs.
GIVE_UP = 4

USAGE = """\
%rpycsvc connect HOST[:PORT]... [--authkey KEY] [--name NAME]   connect a cluster
%rpycsvc local [N] [--name NAME]       start N servers on this machine (default 2)
%rpycsvc                               show the cluster
%rpycsvc close                         close it (and the %%remote sessions)
%%remote [SERVER]                      run the cell on one server (index or host:port)
%%broadcast                            run the cell on every server"""


class RemoteCellError(RpycsvcError):
    """A ``%%remote`` or ``%%broadcast`` cell raised on a server (or its session ended).

    The server's traceback is in the cell's output already, so IPython shows this one line
    instead of a local traceback of the magic."""

    def _render_traceback_(self) -> list[str]:
        return [f"RemoteCellError: {self}"]


class _Abandon(Exception):
    """The cell was interrupted :data:`GIVE_UP` times and still runs: stop its session."""


class _CellInterrupted(KeyboardInterrupt):
    """The kernel's interrupt stopped a remote cell; the server already showed where."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of our frames
        return [f"KeyboardInterrupt: {self}"]


@magics_class
class RpycsvcMagics(Magics):
    """The magics, and what they keep: the cluster and one session per server."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.cluster: Cluster | None = None
        self.name = "cluster"
        #: address -> (the connection it runs on, the session): a reconnected server gets
        #: a new session (the old one died with its connection)
        self.sessions: dict[str, tuple[Any, RemoteSession]] = {}

    # -- %rpycsvc ----------------------------------------------------------------------------
    @line_magic
    def rpycsvc(self, line: str) -> Any:
        """Connect, start, show or close the notebook's cluster (``%rpycsvc help``)."""
        args = shlex.split(line)
        if not args:
            if self.cluster is None:
                raise UsageError("no cluster yet.\n" + USAGE)
            return self.cluster
        command, rest = args[0], args[1:]
        if command in ("help", "-h", "--help"):
            print(USAGE)
            return None
        if command == "close":
            self.close()
            return None
        if command not in ("connect", "local"):
            raise UsageError(f"unknown %rpycsvc command {command!r}.\n{USAGE}")
        hosts, opts = _parse(rest, ("--authkey", "--name"))
        name = opts.get("--name", self.name)
        if not name.isidentifier():
            raise UsageError(f"--name must be a Python identifier; got {name!r}")
        if command == "connect":
            if not hosts:
                raise UsageError("%rpycsvc connect needs at least one HOST[:PORT]")
            new = Cluster(hosts, authkey=opts.get("--authkey"))
        else:
            if len(hosts) > 1 or (hosts and not hosts[0].isdigit()):
                raise UsageError(f"%rpycsvc local takes one number of servers; got {hosts}")
            new = Cluster.local(int(hosts[0]) if hosts else 2)
        self.close()
        self.cluster, self.name = new, name
        assert self.shell is not None  # (magics are registered on a shell)
        self.shell.user_ns[name] = new
        for address, exc in new.unreachable.items():
            print(f"{address} is unreachable: {exc}", file=sys.stderr)
        print(f"{name} = {new!r} ({new.total_workers} workers); "
              "%%remote and %%broadcast run cells there")
        return None

    # -- %%remote ----------------------------------------------------------------------------
    @cell_magic
    def remote(self, line: str, cell: str) -> None:
        """Run the cell on one server (default the first): ``%%remote [INDEX|HOST:PORT]``."""
        address = self._pick(line.strip())
        with _interrupt_refused():
            session = self._session(address)
        outcomes = self._run({address: session}, cell, prefix=False)
        self._raise_for(outcomes)

    # -- %%broadcast -------------------------------------------------------------------------
    @cell_magic
    def broadcast(self, line: str, cell: str) -> None:
        """Run the cell on every server at once; each line of output names its server."""
        if line.strip():
            raise UsageError("%%broadcast takes no arguments (it runs on every server)")
        cluster = self._cluster()
        with _interrupt_refused():
            sessions = self._sessions([c.address for c in cluster.clients])
        if not sessions:
            raise UsageError("no server of the cluster is up")
        self._raise_for(self._run(sessions, cell, prefix=True))

    # -- plumbing ----------------------------------------------------------------------------
    def _cluster(self) -> Cluster:
        if self.cluster is None:
            raise UsageError("no cluster: run %rpycsvc connect HOST... (or %rpycsvc local) "
                             "first")
        return self.cluster

    def _pick(self, which: str) -> str:
        cluster = self._cluster()
        if not which:
            up = cluster.clients
            if not up:
                raise UsageError("no server of the cluster is up")
            return up[0].address
        try:
            key: int | str = int(which)
        except ValueError:
            key = which
        try:
            return cluster[key].address
        except (KeyError, IndexError) as exc:
            raise UsageError(f"no server {which!r} in the cluster; it has "
                             f"{cluster.addresses} (or an index from 0)") from exc

    def _session(self, address: str) -> RemoteSession:
        """The server's session, started on first use (or again after it ended)."""
        client = self._cluster()[address]
        conn, session = self.sessions.get(address, (None, None))
        if session is not None and not session.closed and conn is client.conn:
            return session
        if session is not None:
            session.close()
        if not client.server_info.get("classic", True):
            raise UsageError(f"{address} runs in service-only mode (--no-classic): it runs no "
                             "code from clients, so no %%remote there")
        session = RemoteSession(client.conn)
        self.sessions[address] = (client.conn, session)
        return session

    def _sessions(self, addresses: list[str]) -> dict[str, RemoteSession]:
        """Each server's session; new ones start at once (each waits for its process)."""
        found: dict[str, RemoteSession | BaseException] = {}

        def start(address: str) -> None:
            try:
                found[address] = self._session(address)
            except BaseException as exc:  # raised below, in the cell's thread
                found[address] = exc

        threads = [threading.Thread(target=start, args=(a,), daemon=True,
                                    name=f"rpycsvc-session-{a}") for a in addresses]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # (a bounded join: signal handlers run in between)
                t.join(0.1)
        out: dict[str, RemoteSession] = {}
        for address in addresses:
            got = found.get(address)
            if isinstance(got, BaseException):
                raise got
            assert got is not None
            out[address] = got
        return out

    def _run(self, sessions: dict[str, RemoteSession], source: str,
             prefix: bool) -> dict[str, str]:
        """Run ``source`` in every session at once; the kernel's interrupt stops them.

        Each session is driven by a thread of its own (one RPyC connection each); this
        thread only waits, so the kernel's SIGINT reaches a handler that sets a flag
        (a KeyboardInterrupt inside RPyC's code could leave a connection half-read).
        """
        cell = output.current_cell()
        lines = _Lines(cell, prefix)
        asked: dict[str, threading.Event] = {a: threading.Event() for a in sessions}
        outcomes: dict[str, str] = {}
        presses = 0

        def drive(address: str, session: RemoteSession) -> None:
            def should_interrupt() -> bool:
                if not asked[address].is_set():
                    return False
                asked[address].clear()
                if presses >= GIVE_UP:
                    raise _Abandon
                if presses > 1:
                    lines.write(address, 2, f"\n(the cell goes on there: it ignores the "
                                            f"interrupt; {GIVE_UP - presses} more to stop "
                                            "its session)\n")
                return True

            try:
                outcomes[address] = session.run(
                    source, lambda fd, text: lines.write(address, fd, text),
                    read_line=_read_line if not threads else None,
                    should_interrupt=should_interrupt)
            except _Abandon:
                outcomes[address] = "stopped"
                session.close()
                lines.write(address, 2, "\nstopped the session (its variables are lost)\n")
            except SessionError as exc:
                outcomes[address] = "lost"
                lines.write(address, 2, f"\n{exc}\n")
            except (EOFError, OSError) as exc:
                outcomes[address] = "lost"
                lines.write(address, 2, f"\nconnection to {address} lost "
                                        f"({type(exc).__name__}: {exc})\n")
            finally:
                lines.end(address)

        def on_sigint(signum: int, frame: Any) -> None:
            nonlocal presses
            presses += 1
            for event in asked.values():
                event.set()

        main = threading.current_thread() is threading.main_thread()
        threads: list[threading.Thread] = []
        if len(sessions) > 1 or not main:  # one session: driven here (input() works then)
            threads = [threading.Thread(target=drive, args=item, daemon=True,
                                        name=f"rpycsvc-cell-{item[0]}")
                       for item in sessions.items()]
        old = signal.signal(signal.SIGINT, on_sigint) if main else None
        try:
            if not threads:
                drive(*next(iter(sessions.items())))
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():  # (a bounded join: signal handlers run in between)
                    t.join(0.1)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        for address, session in sessions.items():
            if session.closed or outcomes.get(address) in ("lost", "stopped"):
                session.close()
                self.sessions.pop(address, None)  # the next cell starts a new one
        return outcomes

    @staticmethod
    def _raise_for(outcomes: dict[str, str]) -> None:
        """The cell fails as a local one would: interrupted, or an error (shown already)."""
        interrupted = sorted(a for a, o in outcomes.items() if o == "interrupted")
        if interrupted:
            raise _CellInterrupted(f"the cell was interrupted on {', '.join(interrupted)}")
        failed = {a: o for a, o in outcomes.items() if o != "ok"}
        if failed:
            what = ", ".join(f"{a} ({'raised' if o == 'error' else o})"
                             for a, o in sorted(failed.items()))
            raise RemoteCellError(f"the cell failed on {what}; the traceback is above")

    def close(self) -> None:
        """Stop the sessions and close the cluster (servers we started stop too)."""
        for _, session in self.sessions.values():
            session.close()
        self.sessions.clear()
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            if self.shell is not None and self.shell.user_ns.get(self.name) is cluster:
                del self.shell.user_ns[self.name]
            cluster.close()


def _parse(args: list[str], options: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Positional words and ``--option VALUE`` pairs (only ``options``)."""
    words: list[str] = []
    opts: dict[str, str] = {}
    it = iter(args)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in options:
            if not eq:
                value = next(it, "")
            if not value:
                raise UsageError(f"{name} needs a value")
            opts[name] = value
        elif arg.startswith("--"):
            raise UsageError(f"unknown option {arg!r}.\n{USAGE}")
        else:
            words.append(arg)
    return words, opts


@contextlib.contextmanager
def _interrupt_refused() -> Iterator[None]:
    """While a session starts (RPyC calls on the cluster's connection), an interrupt only
    sets a flag: a KeyboardInterrupt inside RPyC could leave the connection half-read.
    The cell is then interrupted once the calls are done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    asked: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: asked.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if asked:
        raise _CellInterrupted("the cell was interrupted while its session started")


def _read_line(prompt: str) -> str | None:
    """``input()`` in a ``%%remote`` cell: the kernel's own input box (or the terminal).

    Ctrl-C/interrupt at the prompt is a KeyboardInterrupt there, as locally; a frontend
    that can't answer (no stdin) is end of file."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
    try:
        return input(prompt)
    except (KeyboardInterrupt, EOFError):
        raise
    except Exception as exc:  # e.g. StdinNotImplementedError: the frontend has no stdin
        raise EOFError(str(exc)) from exc
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


class _Lines:
    """Writes sessions' output into the cell; with ``prefix``, whole lines named by server.

    Driver threads write here; in a kernel, ``output.in_cell`` files their text under the
    cell that ran the magic (a thread of ours has no cell of its own)."""

    def __init__(self, cell: dict[str, Any] | None, prefix: bool) -> None:
        self.cell, self.prefix = cell, prefix
        self.partial: dict[tuple[str, int], str] = {}
        self.lock = threading.Lock()

    def _stream(self, fd: int) -> Any:
        return sys.stdout if fd == 1 else sys.stderr

    def write(self, address: str, fd: int, text: str) -> None:
        if not self.prefix:
            output.write_above(self._stream(fd), text, self.cell)
            return
        with self.lock:
            text = self.partial.pop((address, fd), "") + text
            body, _, rest = text.rpartition("\n")
            if rest:
                self.partial[(address, fd)] = rest
        if body or text.endswith("\n"):
            block = "".join(f"[{address}] {ln}\n" for ln in (body + "\n").splitlines())
            output.write_above(self._stream(fd), block, self.cell)

    def end(self, address: str) -> None:
        """The session's statement ended: what it left without a newline is written too."""
        for fd in (1, 2):
            with self.lock:
                rest = self.partial.pop((address, fd), "")
            if rest:
                output.write_above(self._stream(fd), f"[{address}] {rest}\n", self.cell)


_MAGICS: list[RpycsvcMagics] = []


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext rpycsvc``: register ``%rpycsvc``, ``%%remote`` and ``%%broadcast``."""
    magics = RpycsvcMagics(ipython)
    ipython.register_magics(magics)
    _MAGICS.append(magics)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext rpycsvc``: close the cluster and the sessions the magics opened."""
    while _MAGICS:
        _MAGICS.pop().close()


def _close_all() -> None:
    for magics in _MAGICS:
        try:
            magics.close()
        except Exception:
            pass


atexit.register(_close_all)  # local servers and sessions stop with the kernel
