"""64 MiB up and down through one server (a research tool): checks what arrives (bytes stay
bytes, arrays stay writable and equal) and prints MB/s, best of N, and a raw TCP socket's
for reference.

    PYTHONPATH=. python tools/perfbig.py [--n 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np

MiB = 1 << 20


def make_bytes(n: int) -> bytes:
    return bytes(n)


def make_array(n: int) -> np.ndarray:
    return np.arange(n // 8, dtype=np.int64)


def size_of(x: object) -> int:
    return len(x) if isinstance(x, bytes) else int(x.nbytes)  # type: ignore[attr-defined]


def raw_tcp(n: int) -> float:
    lst = socket.create_server(("127.0.0.1", 0))
    data = bytes(n)

    def serve() -> None:
        c, _ = lst.accept()
        c.sendall(data)
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    s = socket.create_connection(lst.getsockname())
    buf = bytearray(n)
    view = memoryview(buf)
    t = time.perf_counter()
    got = 0
    while got < n:
        got += s.recv_into(view[got:])
    dt = time.perf_counter() - t
    s.close()
    lst.close()
    return n / dt / 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    import rpycsvc
    from rpycsvc.client.local import read_address

    n = args.mib * MiB
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPYCSVC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.Popen([sys.executable, "-m", "rpycsvc.cli", "serve", "--port", "0", "-q",
                             "--workers", "2", "--exit-on-stdin-eof"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                            cwd=os.path.dirname(os.path.dirname(rpycsvc.__file__)))
    try:
        c = rpycsvc.connect(read_address(proc, 60), timeout=60, output="discard")
        b = c.compute(make_bytes, n)
        assert type(b) is bytes and len(b) == n, type(b)
        a = c.compute(make_array, n)
        assert a.flags.writeable and a[-1] == n // 8 - 1
        assert c.compute(size_of, bytes(n)) == n
        assert c.compute(size_of, a) == n
        best: dict[str, float] = {}
        arr = make_array(n)
        raw = bytes(n)
        for _ in range(args.n):
            for what, fn in (("down bytes", lambda: c.compute(make_bytes, n)),
                             ("down array", lambda: c.compute(make_array, n)),
                             ("up bytes", lambda: c.compute(size_of, raw)),
                             ("up array", lambda: c.compute(size_of, arr))):
                t = time.perf_counter()
                fn()
                rate = n / (time.perf_counter() - t) / 1e6
                best[what] = max(best.get(what, 0.0), rate)
            best["raw tcp"] = max(best.get("raw tcp", 0.0), raw_tcp(n))
        c.close()
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(30)
    print(", ".join(f"{k} {v:,.0f} MB/s" for k, v in best.items()) + f" (best of {args.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
