"""A server shutting down delivers the results of tasks that finish in its grace period,
large ones included: they are written to their clients before the connections close."""

from __future__ import annotations

import signal
import zlib

import pytest

import rpycsvc
from tests.support.rendezvous import Gate, pass_gate
from tests.support.servers import ServerProcess

WAIT = 120.0
MiB = 1 << 20


def big_after_gate(port: int, size: int) -> bytes:
    """Wait at the gate, then return ``size`` bytes (made after the server was told to stop)."""
    pass_gate(port, "big")
    return bytes(range(256)) * (size // 256)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", [1024, 48 * MiB])
def test_a_result_finished_in_the_grace_period_reaches_its_client(
        server_process: type[ServerProcess], size: int) -> None:
    proc = server_process("--workers", "1", "--grace", "30")
    c = rpycsvc.connect(proc.address, output="discard")
    try:
        with Gate() as gate:
            future = c.submit(big_after_gate, gate.port, size)
            _, conn = gate.arrival()  # running now
            proc.proc.send_signal(signal.SIGTERM)
            gate.release(conn)  # it finishes only after the server was told to stop
            data = future.result(timeout=WAIT)
        expected = bytes(range(256)) * (size // 256)
        assert len(data) == size and zlib.crc32(data) == zlib.crc32(expected)
        assert proc.proc.wait(timeout=WAIT) == 0
    finally:
        c.close()
