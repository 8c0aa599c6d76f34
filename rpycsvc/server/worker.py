"""The worker process: runs tasks the server hands it over a local socketpair.

A *process* worker runs one task at a time on its main thread, so CPU-bound tasks use a
core each and a runaway task can be stopped by killing the process. A *thread* worker
runs many tasks at once in threads, for I/O-bound work. Whatever a task prints (through
``sys.stdout``/``sys.stderr`` or, in a process worker, straight to file descriptors 1
and 2) is sent back as whole lines, attributed to the task, while the task runs.

A worker runs only what the server's pool sent it: it reads one ``run`` message, runs the
task, and sends one ``done`` message with the result frames and the seconds it spent on the
task (from reading it to its result pickled: the pool's ``Task.service_s``). Nothing else
is asked of it per task. The server's lean relay (rpycsvc.server.taskserver): a small
task of an rpycsvc client comes as ``run-inline``, the client's own ``run`` message as it
came (unpacked here), and its small result goes back in a ``framed`` message: the client's
whole ``done`` task message, framed here, which the server books and relays as it is.
A task's imports of its client's own modules go through
:class:`~rpycsvc.server.workerimports.TaskImports` (module forwarding).

Started by :mod:`rpycsvc.server.pool` as ``python -m rpycsvc.server.worker --fd N ...``; not an API.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from rpycsvc.protocol.forwarding import Reply
from rpycsvc.protocol.mapchunks import run_chunk
from rpycsvc.protocol.module_finder import ForwardedModules
from rpycsvc.protocol.serialization import (
    FunctionCache,
    dumps,
    loads,
)
from rpycsvc.protocol.taskframes import framed_reply, parse_inline
from rpycsvc.protocol.tracebacks import dump_exception
from rpycsvc.server import wire as _wire
from rpycsvc.server.endpoints import load_endpoints, resolve_path
from rpycsvc.server.workerimports import TaskImports
from rpycsvc.server.workerio import (
    FLUSH_BYTES,
    FLUSH_INTERVAL,
    _FdPump,
    _LogForwarder,
    _Router,
    _TaskContext,
    restore_std_fds,
)


class Worker:
    """One worker process's state: its channel to the server, caches and running tasks."""

    def __init__(self, sock: socket.socket, role: str, threads: int, endpoints: list[str]):
        self.sock = sock
        #: every read of the channel goes through it (it reads ahead)
        self.reader = _wire.Reader(sock)
        self.role = role
        self.send_lock = threading.Lock()
        self.functions = FunctionCache()
        self.local = threading.local()
        self.active: dict[int, _TaskContext] = {}
        self.active_lock = threading.Lock()
        self.inline: _TaskContext | None = None  # the task on the main thread (process role)
        self.thread_ids: dict[int, int] = {}
        self.endpoint_error = ""
        try:
            self.endpoints = load_endpoints(endpoints) if endpoints else {}
        except Exception as exc:  # reported to the server, which refuses to start
            self.endpoints = {}
            self.endpoint_error = str(exc)
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, "rpycsvc-task") if role == "thread" else None
        self.item_pool: ThreadPoolExecutor | None = None
        self.logging_tasks = 0
        self.fd_pumps: list[_FdPump] = []
        #: what a process worker read from its channel while a task's import waited there for
        #: a module (see recv_module), for the main loop
        self.backlog: deque[tuple[Any, list[Any], float]] = deque()
        # Module forwarding (see rpycsvc.protocol.forwarding): whose client an import asks
        self.imports = TaskImports(self, threaded=self.pool is not None)
        self.forwarded = ForwardedModules(self.imports.current_fetch,
                                          self.forget_functions).install()

    # -- module forwarding -------------------------------------------------------------------
    def forget_functions(self) -> None:
        """Forwarded modules were dropped: functions unpickled by reference to them go too
        (their pickles, just a name, are unchanged)."""
        self.functions = FunctionCache()

    def recv_module(self, req: int, deadline: float) -> Reply | None:
        """Process role, on the main thread, which runs the task: nobody else reads the
        channel meanwhile, so read it for the ``module`` answer to request ``req`` until
        ``time.monotonic()`` ``deadline`` (None: it did not come), keeping what else comes
        for the main loop."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not (self.reader.buffered() or _readable(self.sock, left)):
                return None
            control, frames = self.reader.recv_msg()
            if control[0] == "module" and control[1] == req:
                return control[2]  # type: ignore[no-any-return, unused-ignore]
            self.backlog.append((control, frames, time.perf_counter()))

    def drain_fds(self) -> None:
        for pump in self.fd_pumps:
            pump.drain()

    def after_fork_in_child(self) -> None:
        """In a child a task forked (``os.fork``, multiprocessing's fork start method): let go
        of the worker's channel. Descriptors are not closed on a fork as they are on exec,
        and a child holding it kept the channel open after the worker died (its death went
        unnoticed) and could write into it. It is pointed at /dev/null, not closed: the
        number stays taken, so the socket object the child inherited never closes or uses a
        descriptor it opens later."""
        try:
            null = os.open(os.devnull, os.O_RDWR)
        except OSError:
            return
        try:
            os.dup2(null, self.sock.fileno(), inheritable=False)
        except OSError:
            pass
        os.close(null)
        # What the child prints goes to descriptors 1 and 2, like a program's output: in a
        # process worker, those pipes are read by the parent, which gives it to the task.
        # (Through our routers it would be kept in the child's memory, or sent to the
        # channel it no longer has.)
        self.local.ctx = None
        try:
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (for good)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        except OSError:
            pass

    # -- channel ---------------------------------------------------------------------------
    def send(self, control: tuple[Any, ...], frames: Any = ()) -> None:
        with self.send_lock:
            _wire.send_msg(self.sock, control, frames)

    # -- output ----------------------------------------------------------------------------
    def current(self) -> _TaskContext | None:
        return getattr(self.local, "ctx", None)

    def write(self, fd: int, text: str, ctx: _TaskContext | None) -> bool:
        """Buffer ``text`` for ``ctx``; send whole lines when enough is pending."""
        if ctx is None or not ctx.forward:
            return ctx is not None  # discarded for a task that asked for it, else not ours
        ctx.chunks[fd].append(text)
        ctx.sizes[fd] += len(text)
        if ctx.sizes[fd] >= FLUSH_BYTES:
            with ctx.lock:
                self.flush_locked(ctx, fd, whole_lines=True)
        return True

    def flush_locked(self, ctx: _TaskContext, fd: int, whole_lines: bool) -> None:
        pending = ctx.chunks[fd]
        n = len(pending)
        if not n:
            return
        data = "".join([pending.popleft() for _ in range(n)])
        rest = ""
        if whole_lines:
            cut = data.rfind("\n") + 1
            if cut == 0:
                pending.appendleft(data)
                ctx.sizes[fd] = len(data)
                return
            data, rest = data[:cut], data[cut:]
        if rest:
            pending.appendleft(rest)  # older than anything appended meanwhile
        ctx.sizes[fd] = len(rest)
        self.send(("out", ctx.task_id, fd, data))

    def flush(self, ctx: _TaskContext, whole_lines: bool) -> None:
        with ctx.lock:
            for fd in (1, 2):
                self.flush_locked(ctx, fd, whole_lines)

    def emit_log(self, record_dict: dict[str, Any], ctx: _TaskContext) -> None:
        """Forward a logging record of a task whose client asked for its logs."""
        import pickle

        self.flush(ctx, whole_lines=True)  # keep prints and log records roughly in order
        self.send(("log", ctx.task_id, pickle.dumps(record_dict, protocol=5)))

    def flusher(self) -> None:
        """Every FLUSH_INTERVAL, :meth:`tick`, for the worker's life: an error in one tick
        is logged and the next one comes anyway."""
        while True:
            time.sleep(FLUSH_INTERVAL)
            try:
                if not self.tick():
                    return
            except Exception:
                logging.getLogger("rpycsvc.worker").exception("worker housekeeping failed")

    def tick(self) -> bool:
        """Send complete lines of every running task. False: the server is gone."""
        with self.active_lock:
            running = list(self.active.values())
        for ctx in running:
            try:
                self.flush(ctx, whole_lines=True)
            except OSError:
                return False
        return True

    # -- tasks -----------------------------------------------------------------------------
    def resolve(self, kind: str, spec: Any,
                frames: list[bytearray]) -> tuple[Callable[..., Any], list[bytearray]]:
        if kind == "pickled":
            return self.functions.load(bytes(frames[0])), frames[1:]
        if kind == "endpoint":
            fn = self.endpoints.get(spec)
            if fn is None:
                raise LookupError(
                    f"no endpoint named {spec!r} on this server; it has: "
                    f"{', '.join(sorted(self.endpoints)) or 'none'}"
                )
            return fn, frames
        return resolve_path(spec), frames

    def run(self, task_id: int, kind: str, spec: Any, opts: dict[str, Any],
            frames: list[bytearray], received: float) -> None:
        """Run one task (read at ``time.perf_counter()`` ``received``); its output, and at
        the end one ``done`` message (ok, seconds spent on it, result or exception frames),
        go to the server. A task whose client forwards modules (its options carry ``fwd``)
        asks for them through the server."""
        ctx = _TaskContext(task_id, opts.get("output", True), opts.get("logging", False))
        forwarding = opts.get("fwd")
        self.imports.begin(ctx, forwarding)
        if ctx.logging:
            self.logging_tasks += 1
            logging.getLogger().setLevel(logging.DEBUG)  # the client's loggers decide
        self.local.ctx = ctx
        if self.pool is None:
            self.inline = ctx  # fd-level output now belongs to this task
        with self.active_lock:
            self.active[task_id] = ctx
            self.thread_ids[task_id] = threading.get_ident()
        try:
            try:
                self.forwarded.begin(forwarding)
                fn, data = self.resolve(kind, spec, frames)
                if opts.get("chunk"):  # a map's chunk (process mode): protocol.mapchunks
                    out = run_chunk(fn, data)
                elif opts.get("batch"):
                    out = self._run_batch(fn, data)
                else:
                    args, kwargs = loads(data, "task arguments", writable=False)
                    out = dumps(fn(*args, **kwargs), "result", copy=False)
                ok = True
            except BaseException as exc:  # a task's SystemExit must not end the worker
                ok, out = False, dump_exception(self.forwarded.explain(exc))
            service_s = time.perf_counter() - received
            self.imports.end(ctx)
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:
                pass
            if self.pool is None:
                self.drain_fds()  # what child processes wrote is this task's too
                restore_std_fds(self.fd_pumps)  # in case the task closed some of them
            self.flush(ctx, whole_lines=False)
            if self.pool is not None:
                # From here on a cancel must not raise in this thread: an exception landing
                # between two writes of the "done" message would corrupt the channel.
                with self.active_lock:
                    self.thread_ids.pop(task_id, None)
                    _clear_async_exc()
            key = opts.get("reply_key")
            head = framed_reply(("done", key, "ok", service_s), out) \
                if ok and key is not None else None
            if head is not None:  # framed for the client here: the server only relays it
                self.send(("framed", task_id, service_s,
                           sum(memoryview(f).nbytes for f in out)), (head,))
            else:
                self.send(("done", task_id, ok, service_s), out)
        finally:
            self.local.ctx = None
            self.inline = None
            if ctx.logging:
                self.logging_tasks -= 1
                if not self.logging_tasks:
                    logging.getLogger().setLevel(logging.WARNING)
            with self.active_lock:
                self.active.pop(task_id, None)
                self.thread_ids.pop(task_id, None)

    def _run_batch(self, fn: Callable[..., Any], data: list[bytearray]) -> tuple[bytes, ...]:
        """Run ``fn`` over a chunk of argument tuples; each item keeps its own result or error."""
        items = loads(data, "batch arguments", writable=False)

        def one(args: tuple[Any, ...]) -> tuple[bool, Any]:
            try:
                return True, fn(*args)
            except BaseException as exc:
                return False, dump_exception(exc)

        if self.pool is not None and len(items) > 1:
            # thread mode: a batch's items are I/O-bound, so they run at once
            if self.item_pool is None:
                self.item_pool = ThreadPoolExecutor(self.threads, "rpycsvc-item")
            ctx = self.current()

            def in_ctx(args: tuple[Any, ...]) -> tuple[bool, Any]:
                self.local.ctx = ctx
                try:
                    return one(args)
                finally:
                    self.local.ctx = None

            results = list(self.item_pool.map(in_ctx, items))
        else:
            results = [one(args) for args in items]
        try:
            return dumps(results, "batch results")
        except Exception:
            safe: list[tuple[bool, Any]] = []
            for ok, value in results:
                try:
                    dumps(value, "result")
                    safe.append((ok, value))
                except Exception as exc:
                    safe.append((False, dump_exception(exc)))
            return dumps(safe, "batch results")

    def cancel(self, task_id: int, reason: str) -> None:
        """Stop a task running in a thread by raising in it (takes effect between bytecodes).
        Not once the task is sending its result (see run)."""
        exc: type[BaseException] = TimeoutError if reason == "timeout" else _Cancelled
        with self.active_lock:  # (held while raising: run() drops the task under it)
            ident = self.thread_ids.get(task_id)
            if ident is None:
                return
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                       ctypes.py_object(exc))

    def serve(self) -> None:
        """Take messages from the server until it says ``exit`` or the channel ends."""
        recv = self.reader.recv_msg
        while True:
            while self.backlog:  # what a task's module fetch read meanwhile
                if not self.handle(*self.backlog.popleft()):
                    return
            try:
                control, frames = recv()
            except (EOFError, OSError):
                return
            if not self.handle(control, frames, time.perf_counter()):
                return
            del control, frames  # an idle worker must not keep its last task's arguments

    def handle(self, control: Any, frames: list[Any], received: float) -> bool:
        """Handle a message from the server (read at ``received``); False: time to exit."""
        op = control[0]
        if op == "run" or op == "run-inline":
            if op == "run":
                _, task_id, kind, spec, opts = control
            else:  # a client's run message, forwarded by the server as it came
                task_id = control[1]
                run, _, frames = parse_inline(frames[0], writable=True)
                assert run is not None  # (the server forwards only inline controls)
                _, key, kind, spec, options = run  # (checked by the server)
                opts = dict(options)
                opts["reply_key"] = key
            if self.pool is not None:
                self.pool.submit(self.run, task_id, kind, spec, opts, frames, received)
            else:
                self.run(task_id, kind, spec, opts, frames, received)
        elif op == "cancel":
            self.cancel(control[1], control[2])
        elif op == "module":  # an answer to a task's import (thread role)
            self.imports.answer(control[1], control[2])
        elif op == "exit":
            return False
        return True


def _clear_async_exc() -> None:
    """Drop an exception another thread asked to raise in this one and that has not been
    raised yet (``PyThreadState_SetAsyncExc`` with NULL)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)


class _Cancelled(Exception):
    """Raised inside a thread-mode task that its client cancelled."""


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` has something to read within ``timeout`` seconds (poll, not
    select: descriptors may be over 1023)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _die_with_parent() -> None:
    """Ask Linux to kill us when the server dies, even mid-task."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rpycsvc.server.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--role", choices=("process", "thread"), default="process")
    parser.add_argument("--threads", type=int, default=256)
    parser.add_argument("--endpoints", default="")
    parser.add_argument("--memory-limit", type=int, default=0, help="bytes of address space")
    args = parser.parse_args(argv)
    try:  # our own process group: the server kills it whole, with what tasks started
        os.setpgid(0, 0)
    except OSError:
        pass
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop
    if args.memory_limit:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
    os.set_inheritable(args.fd, False)  # not for the processes tasks start
    sock = socket.socket(fileno=args.fd)
    endpoints = [m for m in args.endpoints.split(",") if m]
    worker = Worker(sock, args.role, args.threads, endpoints)
    os.register_at_fork(after_in_child=worker.after_fork_in_child)
    log = io.TextIOWrapper(os.fdopen(os.dup(2), "wb", buffering=0), write_through=True)
    if args.role == "process":
        worker.fd_pumps = [_FdPump(worker, fd, log) for fd in (1, 2)]
        restore_std_fds(worker.fd_pumps)  # (fd 0 too: /dev/null if we were started without)
    logging.getLogger().addHandler(_LogForwarder(worker))
    logging.getLogger().setLevel(logging.WARNING)
    sys.stdout = _Router(worker, 1, log)
    sys.stderr = _Router(worker, 2, log)
    threading.Thread(target=worker.flusher, name="rpycsvc-flush", daemon=True).start()
    worker.send(("ready", os.getpid(), sorted(worker.endpoints), worker.endpoint_error))
    worker.serve()
    os._exit(0)  # don't wait for abandoned task threads


if __name__ == "__main__":
    main()
