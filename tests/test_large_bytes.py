"""Large ``bytes`` values both ways: read straight into ``bytes`` on arrival
(rpycsvc.protocol.buffers), they must still be ordinary, immutable ``bytes`` with the right
contents — whatever their size around the 1 MiB line where that starts, alone or among other
buffers, over plain TCP and TLS, to a task and back. Read-only views of part of a
``bytes`` object, and ``bytearray`` values, keep their own types."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

import rpycsvc
from rpycsvc.protocol.handshake import client_ssl_context
from tests.support.byvalue import tasks_by_value  # noqa: F401 (an autouse fixture)
from tests.support.certs import Certs
from tests.support.servers import running_server

MiB = 1 << 20
WAIT = 60.0


def pattern(n: int, seed: int) -> bytes:
    """``n`` bytes that differ with ``seed`` and along their length."""
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


def kinds(v: Any) -> Any:
    """The types (and a view's read-only flag) of ``v``, recursively through tuples."""
    if isinstance(v, tuple):
        return tuple(kinds(x) for x in v)
    return (type(v).__name__, v.readonly) if isinstance(v, memoryview) else type(v).__name__


def same_hash(x: bytes) -> bool:
    """``x`` hashes as a fresh copy of it does (hashes differ between processes)."""
    return hash(x) == hash(bytes(bytearray(x)))


def check_and_echo(v: Any) -> tuple[Any, list[str], list[bool], Any]:
    """What the task got (types, digests, whether its bytes hash as copies of them do),
    and ``v`` itself back."""
    items = v if isinstance(v, tuple) else (v,)
    digests = [hashlib.sha256(x).hexdigest() for x in items]
    hashes = [same_hash(x) for x in items if type(x) is bytes]
    return kinds(v), digests, hashes, v


def make(n: int, seed: int) -> bytes:
    return pattern(n, seed)


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_large_bytes_arrive_as_bytes_with_their_contents(
        transport: str, certs: Certs) -> None:
    tls = transport == "tls"
    extra = {"ssl_keyfile": str(certs.server_key),
             "ssl_certfile": str(certs.server_cert)} if tls else {}
    with running_server(workers=1, **extra) as srv, \
            rpycsvc.connect(srv.address, output="discard",
                            ssl=client_ssl_context(ca=str(certs.ca)) if tls else None) as c:
        for n in (MiB - 1, MiB, MiB + 1, 5 * MiB + 3):
            data = pattern(n, n)
            got, digests, hashes, back = c.submit(check_and_echo, data).result(timeout=WAIT)
            assert got == "bytes" and digests == [hashlib.sha256(data).hexdigest()]
            assert hashes == [True]
            assert type(back) is bytes and back == data and same_hash(back)
            made = c.compute(make, n, 7)
            assert type(made) is bytes and made == pattern(n, 7)
        whole = pattern(3 * MiB, 1)
        mixed = (whole, bytearray(pattern(2 * MiB, 2)), memoryview(whole)[MiB:],
                 pattern(4 * MiB, 3))
        got, digests, hashes, back = c.submit(check_and_echo, mixed).result(timeout=WAIT)
        want_kinds = ("bytes", "bytearray", ("memoryview", True), "bytes")
        assert got == want_kinds and kinds(back) == want_kinds
        assert digests == [hashlib.sha256(x).hexdigest() for x in mixed]
        assert [bytes(x) for x in back] == [bytes(x) for x in mixed]
        assert hashes == [True, True]
