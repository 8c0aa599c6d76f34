"""What one hop costs on this machine now (a research tool): p50 of a 1-byte round trip
between two processes over a socketpair (the server <-> worker hop) and over loopback TCP
(the client <-> server hop), and between two threads of one process (a hand-off), each
with CPU per round trip. Used to model a task's p50 as a sum of hops.

    python tools/perfhops.py [--n 5000]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time


def _echo(sock: socket.socket) -> None:
    while True:
        b = sock.recv(64)
        if not b:
            return
        sock.sendall(b)


def _measure(sock: socket.socket, n: int) -> tuple[float, float]:
    lat = []
    c0 = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        sock.sendall(b"x")
        sock.recv(64)
        lat.append(time.perf_counter() - t)
    return statistics.median(lat) * 1e6, (time.process_time() - c0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    n = ap.parse_args().n
    # process <-> process, socketpair
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        _echo(b)
        os._exit(0)
    b.close()
    p50, cpu = _measure(a, n)
    a.close()
    os.waitpid(pid, 0)
    print(f"process<->process socketpair round trip: p50 {p50:.1f} us (caller CPU {cpu:.1f} us)")
    # process <-> process, loopback TCP with TCP_NODELAY
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        conn, _ = lst.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _echo(conn)
        os._exit(0)
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    p50, cpu = _measure(c, n)
    c.close()
    os.waitpid(pid, 0)
    lst.close()
    print(f"process<->process loopback TCP round trip: p50 {p50:.1f} us (caller CPU {cpu:.1f} us)")
    # thread <-> thread of one process, socketpair
    a, b = socket.socketpair()
    t = threading.Thread(target=_echo, args=(b,), daemon=True)
    t.start()
    p50, cpu = _measure(a, n)
    print(f"thread<->thread socketpair round trip:   p50 {p50:.1f} us (process CPU {cpu:.1f} us)")
    a.close()
    relay(n)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    while True:
        b = src.recv(65536)
        if not b:
            return
        dst.sendall(b)


def _cpu_ns(pid: int) -> int:
    import pathlib
    return sum(int((t / "schedstat").read_text().split()[0])
               for t in pathlib.Path(f"/proc/{pid}/task").iterdir())


def relay(n: int) -> None:
    """client --TCP--> relay process (a thread per direction, as the server's) --socketpair-->
    echo process, and back: the floor of a Python relay (no parsing, no books)."""
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    echo_pid = 0
    relay_pid = os.fork()
    if relay_pid == 0:
        a, b = socket.socketpair()
        if os.fork() == 0:
            a.close()
            _echo(b)
            os._exit(0)
        b.close()
        conn, _ = lst.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = threading.Thread(target=_pump, args=(a, conn), daemon=True)
        t.start()
        _pump(conn, a)
        os._exit(0)
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _measure(c, 200)
    r0 = _cpu_ns(relay_pid)
    p50, cpu = _measure(c, n)
    r1 = _cpu_ns(relay_pid)
    c.close()
    os.waitpid(relay_pid, 0)
    del echo_pid
    print(f"client -> Python relay process -> echo process round trip: p50 {p50:.1f} us "
          f"(client CPU {cpu:.1f} us, relay CPU {(r1 - r0) / n / 1e3:.1f} us per round trip)")


if __name__ == "__main__":
    main()
