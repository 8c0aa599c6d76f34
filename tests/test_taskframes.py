"""Task messages (:mod:`rpycsvc.protocol.taskframes`) on real sockets, pipes and processes.

A task message rides inside a client's one RPyC connection as a frame whose flag byte is
:data:`~rpycsvc.protocol.taskframes.TASK_FLAG`. These tests check what that promises, from the
outside: RPyC calls and task messages interleave on one connection without mixing;
256 MiB cross each way over TCP and over pipes; a message over the server's limit fails its
task alone (the frames are read and dropped, not kept) while the connection stays; garbage
closes only the connection that sent it (and is logged); ``wait=False`` sends never block,
even towards a frozen server; a task's output arrives, in order, before its result.

Functions of this module travel by value (a stdio server need not import it).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pickle
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import rpyc

import rpycsvc
from rpycsvc.client.calls import frames_of_call
from rpycsvc.client.opening import connect_stream
from rpycsvc.protocol import taskframes
from rpycsvc.protocol.pipes import FastPipeStream
from rpycsvc.protocol.sending import send_task
from rpycsvc.protocol.taskframes import TASK_FLAG
from rpycsvc.server.metrics import serve_metrics
from tests.support.byvalue import (
    available_memory,
    tasks_by_value,  # noqa: F401 (an autouse fixture)
)
from tests.support.logs import Collect
from tests.support.servers import REPO, ServerProcess, running_server

try:  # numpy is optional: the array half of the large test needs it
    import numpy
except ImportError:  # pragma: no cover - the venv has it
    numpy = None  # type: ignore[assignment]

MiB = 1 << 20
GiB = 1 << 30
#: The bound on every wait for an answer: a failure shows as an error, never a hang.
WAIT = 60.0
#: The bound for calls that must not block at all (their failure mode is blocking until
#: the frozen server is resumed, i.e. forever): generous for a loaded 2-core machine.
NO_BLOCK = 5.0
#: RPyC's frame header (see rpyc.core.channel.Channel): length, flag.
FRAME_HEADER = struct.Struct("!LB")
#: A task message's counts: number of frames, control length (see rpycsvc.protocol.taskframes).
COUNTS = struct.Struct("!II")



# -- tasks (run remotely) -------------------------------------------------------------------------
def echo_checked(data: Any) -> tuple[int, int, Any]:
    """``(length, CRC-32, data)`` as the worker saw it: the argument checked on arrival,
    and sent back as the result."""
    view = memoryview(data).cast("B")
    return view.nbytes, zlib.crc32(view), data


def numbered_line(i: int) -> str:
    """Line ``i`` of :func:`print_lines`: every 50th is 8 KiB long (its output message goes
    through the connection's writer thread, not written directly: the result must not
    overtake it)."""
    return f"line {i:03d}" + ("." * 8192 if i % 50 == 49 else "")


def print_lines(n: int) -> int:
    for i in range(n):
        print(numbered_line(i))
    return n


def worker_pid() -> int:
    return os.getpid()


# -- helpers --------------------------------------------------------------------------------------
def crc(data: Any) -> int:
    return zlib.crc32(memoryview(data).cast("B"))



def wait_for(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def in_thread(fn: Callable[[], Any], bound: float) -> Any:
    """``fn()`` in a daemon thread; its result, or fail if it is still running after
    ``bound`` seconds (so a call that blocks fails the test instead of hanging it)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # reported below
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound)
    assert not t.is_alive(), f"{fn!r} was still blocked after {bound:g} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def raw_task_frame(inline: bytes, announce: int | None = None) -> bytes:
    """One task message as bytes on the wire: RPyC's header with the task flag, then
    ``inline`` (its length announced as ``announce`` if given)."""
    return FRAME_HEADER.pack(len(inline) if announce is None else announce, TASK_FLAG) + inline


class LogCapture:
    """Everything logged to ``rpycsvc.server`` (the refusals of the channel included, at
    whatever level the rate limiter chose) while the context is open."""

    def __init__(self) -> None:
        self.handler = Collect()
        self.logger = logging.getLogger("rpycsvc.server")

    def __enter__(self) -> LogCapture:
        self._level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self._level)

    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.handler.records)


class StdioServer:
    """``rpycsvc serve --mode stdio`` driven over a subprocess's pipes, as a deployed server
    is over ssh (without the ssh); its client over :class:`FastPipeStream`."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rpycsvc.cli", "serve", "--mode", "stdio", "-q", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})

    def connect(self, **kw: Any) -> rpycsvc.Client:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        return connect_stream(FastPipeStream(self.proc.stdout, self.proc.stdin),
                              address="stdio", **kw)

    def stop(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- 1. RPyC calls and task messages interleave on one connection ---------------------------------
@pytest.fixture(params=["tcp", "stdio"])
def any_client(request: pytest.FixtureRequest) -> Iterator[rpycsvc.Client]:
    """A client of the module's server over TCP, or of a stdio server over its pipes."""
    if request.param == "tcp":
        server = request.getfixturevalue("server")
        with rpycsvc.connect(server.address, output="discard") as c:
            yield c
        return
    srv_stdio = StdioServer("--workers", "2")
    try:
        c = srv_stdio.connect(output="discard")
        try:
            yield c
        finally:
            c.close()
    finally:
        srv_stdio.stop()


@pytest.mark.timeout(300)
def test_classic_calls_and_tasks_from_8_threads_interleave(any_client: rpycsvc.Client) -> None:
    """8 threads share one client for a few seconds, each mixing classic RPyC calls,
    ``compute`` and ``submit`` with arguments of every size class (none, inline, a large
    frame, an mmap'd frame over 1 MiB): every answer is the right one, nothing hangs."""
    sizes = (0, 100, 70 * 1024, 2 * MiB + 3)
    with any_client as c:
        server_pid = c.stats()["pid"]
        stop_at = time.monotonic() + 4.0
        done: list[int] = []

        def hammer(seed: int) -> int:
            rng = random.Random(seed)
            rounds = 0
            while rounds < 3 or time.monotonic() < stop_at:
                assert c.modules.os.getpid() == server_pid
                data = rng.randbytes(rng.choice(sizes))
                assert c.compute(echo_checked, data) == (len(data), zlib.crc32(data), data)
                futs = [c.submit(pow, seed, k) for k in range(3)]
                big = c.submit(echo_checked, bytearray(data))
                assert c.modules.builtins.len(data[:1000]) == min(len(data), 1000)
                assert [f.result(timeout=WAIT) for f in futs] == [seed ** k for k in range(3)]
                n, sum32, back = big.result(timeout=WAIT)
                assert (n, sum32, bytes(back)) == (len(data), zlib.crc32(data), data)
                assert c.options(mode="thread").submit(abs, -seed).result(timeout=WAIT) == seed
                rounds += 1
            return rounds

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(hammer, seed) for seed in range(1, 9)]
            for f in concurrent.futures.as_completed(futures, timeout=240):
                done.append(f.result())
        assert len(done) == 8 and min(done) >= 3, done
        assert not c.closed and c.compute(worker_pid) != server_pid


# -- 2. 256 MiB each way, over TCP and over pipes -------------------------------------------------
@pytest.fixture(params=["tcp", "stdio"])
def big_client(request: pytest.FixtureRequest) -> Iterator[rpycsvc.Client]:
    """A client of a fresh 1-worker server: over TCP, or over a stdio server's pipes."""
    if request.param == "tcp":
        with running_server(workers=1) as srv, \
                rpycsvc.connect(srv.address, output="discard") as c:
            yield c
        return
    srv_stdio = StdioServer("--workers", "1")
    try:
        c = srv_stdio.connect(output="discard")
        try:
            yield c
        finally:
            c.close()
    finally:
        srv_stdio.stop()


@pytest.mark.slow
@pytest.mark.skipif(available_memory() < 4 * GiB,
                    reason="needs ~4 GiB of available memory (MemAvailable)")
@pytest.mark.timeout(1200)
def test_256_mib_argument_and_result(big_client: rpycsvc.Client) -> None:
    """256 MiB of random bytes (and, with numpy, a 256 MiB float64 array) as the argument
    and back as the result: the worker's length and CRC of what arrived, and what came
    back, match what was sent; the connection stays."""
    c = big_client
    n = 256 * MiB
    data = os.urandom(n)
    want = zlib.crc32(data)
    size, sum32, back = c.submit(echo_checked, data).result(timeout=900)
    assert (size, sum32) == (n, want), "the argument arrived changed"
    assert type(back) is bytes and len(back) == n and zlib.crc32(back) == want
    del data, back
    if numpy is not None:
        arr = numpy.random.default_rng(256).random(n // 8)
        want = crc(arr)
        size, sum32, back = c.submit(echo_checked, arr).result(timeout=900)
        assert (size, sum32) == (n, want), "the array arrived changed"
        assert isinstance(back, numpy.ndarray) and back.dtype == arr.dtype
        assert back.shape == arr.shape and crc(back) == want
        del arr, back
    assert c.compute(abs, -7) == 7 and not c.closed


# -- 3. over the server's message limit -----------------------------------------------------------
@pytest.mark.timeout(300)
def test_over_the_limit_fails_alone_and_the_frames_are_not_kept(
        server_process: type[ServerProcess]) -> None:
    """A server with an 8 MiB limit. A 9 MiB argument fails alone with
    MessageTooLargeError naming --max-message-size (the client's own check). Then task
    messages that bypass that check, written with ``send_task`` on the connection: the
    server reads their 9 MiB frames a piece at a time and drops them (its RSS does not grow
    by their size), answers ``("error", key, "MessageTooLargeError", ...)`` and keeps the
    connection: the next task works."""
    limit = 8 * MiB
    over = 9 * MiB
    srv = server_process("--max-message-size", str(limit), "--workers", "1")
    with rpycsvc.connect(srv.address, output="discard", lost_after=None) as c:
        with pytest.raises(rpycsvc.MessageTooLargeError, match="--max-message-size"):
            c.submit(len, bytes(over)).result(timeout=WAIT)
        assert c.compute(len, b"abc") == 3

        rss_before = c.stats()["rss_bytes"]
        rounds = 4
        for i in range(rounds):
            # A task of ours that runs a while: its key is known to the client, so the
            # server's answer to a message under that key reaches our done callback.
            kind, spec, frames = frames_of_call("time:sleep", (10 * WAIT,), {})
            reply: concurrent.futures.Future[tuple[str, Any]] = concurrent.futures.Future()
            key = c.start_task(kind, spec, {}, frames,
                               lambda status, value, r=reply: r.set_result((status, value)))
            send_task(c.conn, ("run", key, "path", "builtins:len", ()),
                      [bytearray([i + 1]) * over])
            status, value = reply.result(timeout=WAIT)
            assert status == "reply" and value[:2] == ("error", "MessageTooLargeError"), value
            assert "--max-message-size" in value[2], value
            c.cancel_task(key)
            assert c.compute(len, b"abcd") == 4, "the connection did not stay usable"
        rss_after = c.stats()["rss_bytes"]
        assert not c.closed
    grew = rss_after - rss_before
    # (read into buffers and kept, 4 x 9 MiB would show; allocator noise is far less)
    assert grew < over, f"the server's RSS grew by {grew} bytes over {rounds} refused messages"


# -- 4. garbage closes only its own connection ----------------------------------------------------
def _global_in_control() -> bytes:
    ctl = pickle.dumps(("run", 1, "path", os.system, ()), protocol=5)
    return raw_task_frame(COUNTS.pack(0, len(ctl)) + ctl)


def _over_max_inline() -> bytes:
    return raw_task_frame(b"", announce=taskframes.MAX_INLINE + 1)


def _corrupt_counts() -> bytes:
    return raw_task_frame(COUNTS.pack(0xFFFFFFFF, 5) + b"\x80\x05N.\x00")


def _control_past_its_bytes() -> bytes:
    ctl = pickle.dumps(("cancel", 1), protocol=5)
    return raw_task_frame(COUNTS.pack(0, len(ctl) + 100) + ctl)


GARBAGE: dict[str, tuple[Callable[[], bytes], str]] = {
    # name: (the bytes, what the server's log says)
    "global-in-control": (_global_in_control, "may hold no objects of"),
    "over-max-inline": (_over_max_inline, f"(at most {taskframes.MAX_INLINE})"),
    "corrupt-counts": (_corrupt_counts, "a corrupt task message"),
    "control-past-its-bytes": (_control_past_its_bytes, "a corrupt task message"),
}


@pytest.fixture(scope="module")
def small_server() -> Iterator[rpycsvc.Server]:
    with running_server(workers=1) as srv:
        yield srv


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_from_a_client_closes_that_connection_only(
        small_server: rpycsvc.Server, case: str) -> None:
    make, logged = GARBAGE[case]
    with LogCapture() as logs, \
            rpycsvc.connect(small_server.address, output="discard") as other, \
            rpycsvc.connect(small_server.address, output="discard", lost_after=None) as bad:
        assert bad.compute(abs, -1) == 1  # said hello, and a task went both ways
        bad.conn._channel.stream.sock.sendall(make())
        wait_for(lambda: bad.closed, "the server to close the garbage sender's connection")
        with pytest.raises(rpycsvc.ServerLostError):
            bad.submit(abs, -2).result(timeout=WAIT)
        assert other.compute(abs, -3) == 3 and other.submit(pow, 2, 5).result(WAIT) == 32
        assert not other.closed
        wait_for(lambda: logged in logs.text(), f"the refusal ({logged!r}) in the log", 10)


@pytest.mark.timeout(120)
def test_a_task_message_from_a_plain_rpyc_peer_closes_it(small_server: rpycsvc.Server) -> None:
    """A plain RPyC client (no rpycsvc hello) may not send task messages, even well formed
    ones: its connection is closed; the server goes on serving its other clients."""
    ctl = pickle.dumps(("cancel", 1), protocol=5)
    with LogCapture() as logs, \
            rpycsvc.connect(small_server.address, output="discard") as other:
        plain = rpyc.classic.connect("127.0.0.1", int(small_server.address.rsplit(":", 1)[1]))
        try:
            assert plain.modules.os.getpid() == os.getpid()  # the in-process server's
            plain._channel.stream.sock.sendall(raw_task_frame(COUNTS.pack(0, len(ctl)) + ctl))
            deadline = time.monotonic() + WAIT
            with pytest.raises(EOFError):
                while time.monotonic() < deadline:
                    plain.serve(0.1)
        finally:
            plain.close()
        assert other.compute(abs, -4) == 4 and not other.closed
        wait_for(lambda: "has not said the rpycsvc hello" in logs.text(),
                 "the refusal in the log", 10)


# -- 5. wait=False never blocks, even towards a frozen server --------------------------------------
@pytest.fixture(params=["tcp", "stdio"])
def freezable(request: pytest.FixtureRequest, server_process: type[ServerProcess]
              ) -> Iterator[tuple[rpycsvc.Client, int, Callable[[], bool]]]:
    """``(client, server pid, "can the client write now?")`` for a 1-worker server in a
    process of its own: over TCP, or a stdio server over its pipes. The client has no
    liveness check (the test freezes the server: only blocking is in question)."""
    if request.param == "tcp":
        srv = server_process("--workers", "1")
        with rpycsvc.connect(srv.address, output="discard", lost_after=None) as c:
            sock = c.conn._channel.stream.sock
            yield c, srv.pid, lambda: bool(select.select((), (sock,), (), 0)[1])
        return
    srv_stdio = StdioServer("--workers", "1")
    try:
        c = srv_stdio.connect(output="discard", lost_after=None)
        try:
            fd = srv_stdio.proc.stdin.fileno()  # type: ignore[union-attr]
            yield c, srv_stdio.proc.pid, lambda: bool(select.select((), (fd,), (), 0)[1])
        finally:
            c.close()
    finally:
        srv_stdio.stop()


@pytest.mark.timeout(300)
def test_stop_and_unwaited_sends_do_not_block_on_a_full_socket(
        freezable: tuple[rpycsvc.Client, int, Callable[[], bool]]) -> None:
    """The server is SIGSTOPped with a task of ours running, and another thread's 64 MiB
    submit fills the socket (or pipe) and blocks in its write. ``future.stop()`` still
    returns at once (its cancel message is queued for the connection's writer),
    ``cancel()`` too, and so do 1000 ``send_task(..., wait=False)``. Once the server
    resumes, everything queued arrives in order: the big task's answer is right and the
    connection works."""
    c, pid, writable = freezable
    assert c.compute(abs, -1) == 1
    sleeper = c.submit(time.sleep, 120)
    wait_for(lambda: c.stats()["tasks_running"] >= 1, "the sleeping task to start")
    big_data = bytes(64 * MiB)
    big: concurrent.futures.Future[Any] = concurrent.futures.Future()
    os.kill(pid, signal.SIGSTOP)
    try:
        def submit_big() -> None:
            try:
                big.set_result(c.submit(echo_checked, big_data))
            except BaseException as exc:
                big.set_exception(exc)

        threading.Thread(target=submit_big, daemon=True).start()
        wait_for(lambda: not writable(), "the client's socket (or pipe) buffer to fill")
        assert not big.done(), "a 64 MiB submit to a stopped server did not block"

        assert in_thread(sleeper.stop, NO_BLOCK) is True
        with pytest.raises(rpycsvc.TaskCancelledError):
            sleeper.result(timeout=0)
        assert in_thread(sleeper.cancel, NO_BLOCK) is False  # done already

        def many() -> None:
            for i in range(1000):
                send_task(c.conn, ("cancel", 10**9 + i), wait=False)

        in_thread(many, NO_BLOCK)
        # still full, still blocked: the above did not get through by luck
        assert not writable() and not big.done()
    finally:
        os.kill(pid, signal.SIGCONT)
    fut = big.result(timeout=WAIT)
    size, sum32, back = fut.result(timeout=WAIT)
    assert (size, sum32, len(back)) == (len(big_data), crc(big_data), len(big_data))
    assert c.compute(abs, -2) == 2 and not c.closed
    wait_for(lambda: c.stats()["tasks_running"] == 0, "the stopped task to end")


# -- 6. a task's output arrives in order, before its result ----------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["process", "thread"])
def test_output_arrives_in_order_before_the_result(server: rpycsvc.Server, mode: str) -> None:
    """A task prints 200 lines, then returns: all of them are in ``future.stdout``, in
    order, when its result is set (thread-mode tasks run elsewhere: both are checked)."""
    lines = "".join(numbered_line(i) + "\n" for i in range(200))
    with rpycsvc.connect(server.address, output="capture", mode=mode) as c:
        # submit(): complete when result() returns
        fut = c.submit(print_lines, 200)
        assert fut.result(timeout=WAIT) == 200
        assert fut.stdout == lines

        # start_task(): the output as it stood at the very moment the result arrived
        sink = rpycsvc.TaskFuture()
        seen: concurrent.futures.Future[tuple[Any, str]] = concurrent.futures.Future()
        kind, spec, frames = frames_of_call(print_lines, (200,), {})
        c.start_task(kind, spec, {"mode": mode}, frames,
                     lambda status, value: seen.set_result((value, sink.stdout)), sink)
        reply, stdout_then = seen.result(timeout=WAIT)
        assert reply[0] == "ok", reply
        assert stdout_then == lines


# -- 7. large frames: the stall timeout and the inbound budget -------------------------------------
@pytest.mark.timeout(120)
def test_a_peer_stalling_inside_a_large_frame_is_dropped(small_server_stall: rpycsvc.Server
                                                          ) -> None:
    """A client that sends 1 MiB of a 2 MiB frame and then nothing, while holding that much
    of the server's inbound budget, is dropped after ``--stall-timeout`` (logged, naming the
    setting); the server's other clients go on."""
    msg = taskframes.TaskMessage(("run", 1, "path", "builtins:len", ()), [bytes(2 * MiB)])
    assert msg.large, "a 2 MiB frame should travel outside the inline block"
    with LogCapture() as logs, \
            rpycsvc.connect(small_server_stall.address, output="discard") as other, \
            rpycsvc.connect(small_server_stall.address, output="discard",
                            lost_after=None) as bad:
        assert bad.compute(abs, -1) == 1
        bad.conn._channel.stream.sock.sendall(msg.head + bytes(MiB))
        wait_for(lambda: bad.closed, "the server to drop the stalled client")
        assert other.compute(abs, -2) == 2 and not other.closed
        wait_for(lambda: "--stall-timeout" in logs.text(), "the stall in the log", 10)


@pytest.fixture(scope="module")
def small_server_stall() -> Iterator[rpycsvc.Server]:
    with running_server(workers=1, stall_timeout=1.0) as srv:
        yield srv


@pytest.mark.timeout(300)
def test_large_frames_from_several_clients_share_a_small_inbound_budget() -> None:
    """Frames of 6 MiB from 4 clients at once into an 8 MiB inbound budget: readers take
    it a piece at a time and wait for each other, and every task gets its bytes intact
    (no reader waits forever for budget that another holds)."""
    limit = 8 * MiB
    with running_server(workers=2, max_message_size=limit, inbound_budget=limit) as srv:
        httpd = serve_metrics(srv, 0)
        clients = [rpycsvc.connect(srv.address, output="discard") for _ in range(4)]
        try:
            waits0 = inbound_waits(httpd)
            with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
                for _round in range(3):
                    datas = [os.urandom(6 * MiB) for _ in clients]
                    sent = [pool.submit(c.submit, echo_checked, d)
                            for c, d in zip(clients, datas)]
                    for s, data in zip(sent, datas):
                        size, sum32, back = s.result(timeout=WAIT).result(timeout=WAIT)
                        assert (size, sum32) == (len(data), zlib.crc32(data))
                        assert back == data
            assert all(c.compute(abs, -1) == 1 for c in clients)
            # (the premise: readers did wait for the budget; typically dozens of times)
            assert inbound_waits(httpd) > waits0, "no reader waited: the budget was not exercised"
        finally:
            for c in clients:
                c.close()
            httpd.close()


def inbound_waits(httpd: Any) -> float:
    """``rpycsvc_inbound_waits_total`` from the server's metrics page."""
    url = f"http://127.0.0.1:{httpd.server_address[1]}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("rpycsvc_inbound_waits_total "):
            return float(line.split()[1])
    raise AssertionError("no rpycsvc_inbound_waits_total on the metrics page")


# -- a sender blocked on a frozen server is released when the server is declared lost --------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["tcp", "stdio"])
def test_a_submit_blocked_on_a_frozen_server_fails_once_it_is_declared_lost(
        server_process: type[ServerProcess], transport: str) -> None:
    """A 64 MiB submit blocks writing to a SIGSTOPped server; once the client declares
    the server lost (``lost_after=2``), that submit raises ServerLostError too, instead of
    waiting for the server to wake up. Over TCP the socket is shut down; over pipes (a
    deployed server's ssh pipes: a frozen server keeps ssh, and so the pipe, open) the
    blocked write must give up by itself (it did not before 7f3068a)."""
    stdio: StdioServer | None = None
    if transport == "tcp":
        srv = server_process("--workers", "1")
        c = rpycsvc.connect(srv.address, output="discard", lost_after=2.0)
        pid = srv.pid
    else:
        stdio = StdioServer("--workers", "1")
        c = stdio.connect(output="discard", lost_after=2.0)
        pid = stdio.proc.pid
    outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def submit_big() -> None:
        try:
            outcome.set_result(c.submit(len, bytes(64 * MiB)).result(timeout=WAIT))
        except BaseException as exc:
            outcome.set_exception(exc)

    try:
        assert c.compute(abs, -1) == 1
        os.kill(pid, signal.SIGSTOP)
        try:
            threading.Thread(target=submit_big, daemon=True).start()
            wait_for(lambda: c.closed, "the frozen server to be declared lost", 30)
            try:
                exc = outcome.exception(timeout=10)
            except concurrent.futures.TimeoutError:
                raise AssertionError(f"the submit was still blocked 10 s after {transport} "
                                     "server was declared lost") from None
            assert isinstance(exc, rpycsvc.ServerLostError), exc
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        c.close()
        if stdio is not None:
            stdio.stop()


# -- a frozen client does not hold up the server's other clients -----------------------------------
FROZEN_CLIENT = r"""
import sys, time
import rpycsvc
c = rpycsvc.connect(sys.argv[1], output="discard", lost_after=None)
futs = [c.submit(lambda: (time.sleep(1.0), bytes(32 << 20))[1]) for _ in range(4)]
print("sent", flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(180)
def test_results_for_a_frozen_client_do_not_hold_up_other_clients() -> None:
    """A client (a process of its own) is SIGSTOPped while 4 tasks of its run that each
    return 32 MiB: the server's answers to it fill its socket and wait on its connection's
    writer, while another client's tasks (small and 4 MiB results) go on being answered."""
    with running_server(workers=2) as srv, \
            rpycsvc.connect(srv.address, output="discard") as c:
        proc = subprocess.Popen([sys.executable, "-c", FROZEN_CLIENT, srv.address],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"sent\n"
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                wait_for(lambda: c.stats()["tasks_running"] == 0,
                         "the frozen client's tasks to end")
                for i in range(20):
                    assert c.submit(abs, -i).result(timeout=WAIT) == i
                    data = c.submit(bytes, 4 * MiB).result(timeout=WAIT)
                    assert len(data) == 4 * MiB and not any(data[:1024])
            finally:
                os.kill(proc.pid, signal.SIGCONT)
        finally:
            proc.kill()
            proc.wait(10)
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    f.close()
        assert c.compute(abs, -1) == 1 and not c.closed


# -- a closed pipe connection writes nowhere else ---------------------------------------------
@pytest.mark.timeout(120)
def test_closing_a_pipe_client_mid_write_writes_nothing_into_a_reused_descriptor() -> None:
    """A 16 MiB submit blocks writing to a SIGSTOPped stdio server; the client is closed
    (no liveness check: nothing declares the server lost first). The descriptor it wrote to
    is free now, and the next pipe this process makes gets its number: not one byte of the
    task may arrive in that pipe."""
    srv = StdioServer("--workers", "1")
    c = srv.connect(output="discard", lost_after=None)
    assert srv.proc.stdin is not None
    out_fd = srv.proc.stdin.fileno()
    pattern = b"TASKDATA"
    payload = pattern * (2 * MiB)
    submit: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def submit_big() -> None:
        try:
            submit.set_result(c.submit(len, payload))
        except BaseException as exc:
            submit.set_exception(exc)

    mine: list[tuple[int, int]] = []
    reused: tuple[int, int] | None = None
    got = b""
    try:
        assert c.compute(abs, -1) == 1
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            threading.Thread(target=submit_big, daemon=True).start()
            wait_for(lambda: not select.select((), (out_fd,), (), 0)[1],
                     "the pipe to the stopped server to fill")
            assert not submit.done()
            in_thread(lambda: c.close(timeout=5), 30)
            for _ in range(64):  # the lowest free number is taken first (POSIX)
                r, w = os.pipe()
                mine.append((r, w))
                if out_fd in (r, w):
                    reused = (r, w)
                    break
            if reused is None:
                pytest.skip(f"descriptor {out_fd} was not reused by this process's next pipes")
            os.set_blocking(reused[0], False)
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and not got:
                try:
                    got += os.read(reused[0], 1 << 16)
                except BlockingIOError:
                    time.sleep(0.05)
            assert not got, (f"{len(got)}+ bytes of the closed connection's task arrived in "
                             f"a new pipe that reused descriptor {out_fd}: {got[:24]!r}")
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
    finally:
        if reused is not None:  # drain what a stray writer still sends there, then close
            end = time.monotonic() + 30
            while not submit.done() and time.monotonic() < end:
                try:
                    os.read(reused[0], 1 << 20)
                except BlockingIOError:
                    time.sleep(0.01)
        for r, w in mine:
            os.close(r)
            os.close(w)
        c.close()
        srv.stop()
