"""A small block of memory each process worker shares with its server.

Lane tasks (:mod:`rpycsvc.lane`) reach a worker without passing through the server, and a
message to the server for each of them would cost the worker and the server more than a
short task itself. So the worker writes here instead, with plain memory stores: which
lane's task it runs now (its number, start time and label), and running totals of the
lane tasks it finished (done, failed, bytes, a duration histogram). The server reads it
for ``stats()``, ``rpycsvc top`` and metrics, when it schedules (a worker busy with a lane
task is not idle), and when the worker dies (a lane task that died with it is reported as
such, never re-run). The block is a memfd (Linux; a deleted temporary file elsewhere) the
server creates and the worker maps through an inherited descriptor: nothing on disk.

Reads are not atomic with the writes: a reader may see a count a moment late, never a
torn one that matters (each field is one aligned 8-byte word).
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import tempfile
from typing import Any

#: Upper bounds (seconds) of the task-duration histogram; the last catches everything.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, float("inf"))

#: lane number (0: none), started (monotonic), label length, phase (below), the task's key
#: (the client's number for it)
_RUNNING = struct.Struct("=QdIIq")
#: Phases of the lane task in hand: it runs; it finished and its reply is on its way; the
#: worker is still reading it (it has not started).
RUNNING, FINISHED, RECEIVING = 0, 1, 2
_LABEL_AT, _LABEL = 32, 200
_FINISHED_AT = 20
_COUNTS = struct.Struct(f"=QQQQd{len(DURATION_BUCKETS)}Q")  # done failed in out sum buckets
_COUNTS_AT = _LABEL_AT + _LABEL
SIZE = _COUNTS_AT + _COUNTS.size


class WorkerState:
    """The shared block, as the server (``create``) or the worker (``attach``) sees it."""

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm

    @classmethod
    def create(cls) -> tuple[WorkerState, int]:
        """A new zeroed block and a descriptor of it for the worker to inherit (the caller
        closes it once the worker has started)."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("rpycsvc-worker-state")
        else:
            fd, path = tempfile.mkstemp(prefix="rpycsvc-state-")
            os.unlink(path)
        try:
            os.ftruncate(fd, SIZE)
            return cls(mmap.mmap(fd, SIZE)), fd
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> WorkerState:
        return cls(mmap.mmap(fd, SIZE))

    # -- the worker writes -------------------------------------------------------------------
    def begin(self, number: int, label: str, started: float, key: int) -> None:
        """A task of lane ``number`` starts (the label first: readers trust it once the
        number is set)."""
        text = label.encode(errors="replace")[:_LABEL]
        self.mm[_LABEL_AT:_LABEL_AT + len(text)] = text
        _RUNNING.pack_into(self.mm, 0, number, started, len(text), 0, key)

    def receiving(self, number: int, started: float) -> None:
        """We are reading a task from lane ``number`` (busy, though nothing runs yet)."""
        _RUNNING.pack_into(self.mm, 0, number, started, 0, RECEIVING, 0)

    def end(self) -> None:
        """The lane task is over: none runs now."""
        _RUNNING.pack_into(self.mm, 0, 0, 0.0, 0, 0, 0)

    def count(self, ok: bool, seconds: float, bytes_in: int, bytes_out: int) -> None:
        """Count a finished lane task, and mark it finished (before its reply goes out: a
        client that asks for stats after its result sees it counted, not running)."""
        self.mm[_FINISHED_AT:_FINISHED_AT + 4] = FINISHED.to_bytes(4, sys.byteorder)
        done, failed, nin, nout, total, *buckets = _COUNTS.unpack_from(self.mm, _COUNTS_AT)
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
                break
        _COUNTS.pack_into(self.mm, _COUNTS_AT, done + ok, failed + (not ok), nin + bytes_in,
                          nout + bytes_out, total + seconds, *buckets)

    # -- the server reads --------------------------------------------------------------------
    def running(self) -> tuple[int, str, float, int, int]:
        """``(lane number, label, started, phase, key)`` of the lane task in hand (number
        0: none; phase RUNNING, FINISHED or RECEIVING)."""
        number, started, n, phase, key = _RUNNING.unpack_from(self.mm)
        label = bytes(self.mm[_LABEL_AT:_LABEL_AT + min(n, _LABEL)])
        return int(number), label.decode(errors="replace"), float(started), int(phase), int(key)

    def counts(self) -> dict[str, Any]:
        """Totals of the lane tasks this worker finished."""
        done, failed, nin, nout, total, *buckets = _COUNTS.unpack_from(self.mm, _COUNTS_AT)
        return {"done": done, "failed": failed, "bytes_in": nin, "bytes_out": nout,
                "duration_sum": total, "buckets": dict(zip(DURATION_BUCKETS, buckets))}

    def close(self) -> None:
        try:
            self.mm.close()
        except (BufferError, ValueError):
            pass
