"""The tasks the workloads run on the servers: no-ops, CPU spins, printed lines, blobs to move.

They are module-level functions so that they pickle by reference: a server's worker imports
this module to run them (and :mod:`~rpycsvc.cli.bench.raw_socket` for the raw reference's far
end), not the rest of the bench.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any


def noop(x: Any = None) -> Any:
    return x


def spin(n: int) -> int:
    """Pure-Python CPU work: ~n * 60 ns, holds the GIL throughout."""
    x = 0
    for i in range(n):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x


def stamp() -> float:
    """When the task ran, on the server's monotonic clock (the same clock as ours on one host)."""
    return time.perf_counter()


def spin_timed(n: int) -> tuple[int, float, float, int]:
    """spin(n), its wall and CPU seconds, and the worker's pid: how much of a core it got."""
    w0, c0 = time.perf_counter(), time.thread_time()
    x = spin(n)
    return x, time.perf_counter() - w0, time.thread_time() - c0, os.getpid()


def print_lines(n: int) -> int:
    for i in range(n):
        print(f"line {i}")
    return n


def digest(obj: Any) -> tuple[int, int, float]:
    """(bytes, CRC-32, seconds spent computing it) — the seconds are not transfer time."""
    t0 = time.perf_counter()
    view = memoryview(obj).cast("B")
    return view.nbytes, zlib.crc32(view), time.perf_counter() - t0


def make_blob(kind: str, nbytes: int, seed: int) -> tuple[Any, int, float]:
    """(a random numpy array or bytes of ``nbytes``, its CRC-32, seconds spent making it)."""
    t0 = time.perf_counter()
    if kind == "numpy":
        import numpy as np

        obj: Any = np.random.default_rng(seed).random(nbytes // 8)
    else:
        obj = random_bytes(nbytes, seed)
    crc = zlib.crc32(memoryview(obj).cast("B"))
    return obj, crc, time.perf_counter() - t0


def random_bytes(n: int, seed: int) -> bytes:
    try:
        import numpy as np

        return np.random.default_rng(seed).bytes(n)
    except ImportError:
        import random

        return random.Random(seed).randbytes(n)


