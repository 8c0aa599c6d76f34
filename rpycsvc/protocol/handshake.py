"""The few bytes before RPyC starts: TLS, versions and the shared-secret challenge.

An rpycsvc client opens with ``RPYCSVC1`` and a JSON hello carrying its versions (rpycsvc,
rpyc, Python, cloudpickle); the server answers with its own, so a version mismatch is
reported by name instead of as RPyC's ``invalid message type: 18``. With an authkey, each
side then proves it knows the key by answering the other's random challenge with an HMAC
(the key never travels), as ``multiprocessing.connection`` does. A plain RPyC client
sends an RPyC frame instead, whose first byte can't be ``R``; it is served as is when the
server needs no authkey.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import platform
import socket
import ssl
import struct
from typing import Any, Callable

import cloudpickle
import rpyc

from rpycsvc._version import __version__
from rpycsvc.errors import AuthenticationError, ConnectError, RpycsvcError, VersionMismatchError

MAGIC = b"RPYCSVC1"
_LEN = struct.Struct("!I")
_MAX_HELLO = 64 * 1024


def versions() -> dict[str, str]:
    """What each side says about itself in its hello (and ``stats()`` as ``*_version``).

    rpycsvc and rpyc must match for the two sides to talk at all (:func:`compatible`);
    Python and cloudpickle may differ, except for tasks holding code sent by value (see
    :mod:`rpycsvc.client.environment`, which checks them before such a task is sent).
    """
    return {
        "rpycsvc": __version__,
        "rpyc": str(rpyc.__version__),
        "python": platform.python_version(),
        "cloudpickle": str(cloudpickle.__version__),
    }


def _send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError("peer closed the connection during the handshake")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_json(sock: socket.socket) -> dict[str, Any]:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > _MAX_HELLO:
        raise EOFError(f"handshake message too large ({n} bytes)")
    obj = json.loads(_recv_exact(sock, n))
    if not isinstance(obj, dict):
        raise EOFError("malformed handshake message")
    return obj


def _digest(key: str, challenge: bytes) -> str:
    return hmac.new(key.encode(), challenge, hashlib.sha256).hexdigest()


def compatible(a: dict[str, str], b: dict[str, str]) -> bool:
    """Same rpycsvc version and same rpyc major.minor: the wire formats then match."""
    return a.get("rpycsvc") == b.get("rpycsvc") and (
        a.get("rpyc", "").split(".")[:2] == b.get("rpyc", "").split(".")[:2]
    )


def mismatch_message(client: dict[str, str], server: dict[str, str], address: str) -> str:
    return (
        f"version mismatch with {address}: this client runs rpycsvc {client.get('rpycsvc')} "
        f"with rpyc {client.get('rpyc')}, the server runs rpycsvc {server.get('rpycsvc')} with "
        f"rpyc {server.get('rpyc')}. Install the same versions on both sides: rpycsvc "
        f"{server.get('rpycsvc')} from a clone of its repository at that version "
        f"(pip install -e CLONE) or a wheel built from one (pip install rpycsvc-*.whl), and "
        f"pip install rpyc=={server.get('rpyc')}; or deploy the server with rpycsvc.deploy, "
        f"which runs this client's own versions on the host."
    )


def server_handshake(
    sock: socket.socket, *, authkey: str | None, timeout: float, server_info: dict[str, Any],
    heard: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run the server's side on a fresh (possibly TLS) socket.

    Returns the credentials: ``{"client": hello or None, "prefix": bytes}``, where ``prefix``
    holds bytes already read that belong to the RPyC stream. Raises
    ``rpyc.utils.authenticators.AuthenticationError`` to refuse. ``heard`` is called once
    the peer has sent its first byte (it is no longer silent).

    Every peer has ``timeout`` seconds to say its first byte, on servers without an authkey
    too: a socket that never speaks would otherwise hold a thread and a descriptor for good.
    A plain RPyC client (on a server without authkey) must send its first request within
    that time; ``rpyc.classic.connect`` does at once, ``rpyc.connect`` at its first call.
    """
    from rpyc.utils.authenticators import AuthenticationError as RpycAuthError

    sock.settimeout(timeout)
    try:
        first = sock.recv(1)
        if not first:
            raise EOFError("client closed the connection before saying anything")
        if heard is not None:
            heard()
        if first != MAGIC[:1]:
            if authkey:
                raise RpycAuthError("a plain RPyC client can't authenticate; use rpycsvc.connect")
            sock.settimeout(None)
            # That byte began an RPyC frame: hand it back to the stream.
            return {"client": None, "prefix": first}
        if first + _recv_exact(sock, len(MAGIC) - 1) != MAGIC:
            raise RpycAuthError("bad handshake magic")
        hello = _recv_json(sock)
        mine = versions()
        reply: dict[str, Any] = {**mine, **server_info, "ok": True, "auth": bool(authkey)}
        if not compatible(hello, mine):
            # The client may be too old to read the fields; say it all in one sentence too.
            message = mismatch_message(hello, mine, str(server_info.get("address") or "server"))
            reply.update(ok=False, error="version mismatch", message=message)
            _send_json(sock, reply)
            raise RpycAuthError(message)
        challenge = os.urandom(32)
        if authkey:
            reply["challenge"] = challenge.hex()
        _send_json(sock, reply)
        if authkey:
            answer = _recv_json(sock)
            good = hmac.compare_digest(str(answer.get("digest", "")), _digest(authkey, challenge))
            client_challenge = bytes.fromhex(str(answer.get("challenge", "")))
            if not good or len(client_challenge) < 16:
                _send_json(sock, {"ok": False, "error": "authentication failed: wrong authkey"})
                raise RpycAuthError("wrong authkey")
            _send_json(sock, {"ok": True, "digest": _digest(authkey, client_challenge)})
        sock.settimeout(None)
        return {"client": hello, "prefix": b""}
    except (OSError, EOFError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        # (a hello of the wrong shape, e.g. numbers where versions go, or nested too deeply)
        raise RpycAuthError(f"handshake failed: {type(exc).__name__}: {exc}") from exc


def client_handshake(
    sock: socket.socket, *, address: str, authkey: str | None, timeout: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the client's side; returns the server's hello (versions, host, pid, workers...).

    ``extra`` adds fields to our hello."""
    sock.settimeout(timeout)
    mine = versions()
    try:
        sock.sendall(MAGIC)
        _send_json(sock, {**(extra or {}), **mine, "auth": bool(authkey)})
        hello = _recv_json(sock)
        if not hello.get("ok", False) or not compatible(mine, hello):
            if hello.get("error") == "version mismatch" or not compatible(mine, hello):
                raise VersionMismatchError(mismatch_message(mine, hello, address), address=address)
            raise ConnectError(f"{address} refused the connection: {hello.get('error')}",
                               address=address)
        if hello.get("auth"):
            if not authkey:
                raise AuthenticationError(
                    f"{address} requires an authkey; pass authkey=... (or set RPYCSVC_AUTHKEY)",
                    address=address,
                )
            my_challenge = os.urandom(32)
            _send_json(sock, {"digest": _digest(authkey, bytes.fromhex(hello["challenge"])),
                              "challenge": my_challenge.hex()})
            verdict = _recv_json(sock)
            if not verdict.get("ok"):
                raise AuthenticationError(
                    f"{address} rejected our authkey: {verdict.get('error', 'wrong authkey')}",
                    address=address,
                )
            if not hmac.compare_digest(str(verdict.get("digest", "")),
                                       _digest(authkey, my_challenge)):
                raise AuthenticationError(
                    f"{address} does not know our authkey: it may be an impostor", address=address
                )
    except RpycsvcError:
        raise  # ours already; ConnectError is an OSError, don't wrap it again below
    except (EOFError, OSError, ValueError) as exc:
        raise ConnectError(
            f"handshake with {address} failed ({type(exc).__name__}: {exc}); is it an rpycsvc "
            "server, and do TLS settings match on both sides?",
            address=address,
        ) from exc
    sock.settimeout(None)
    return hello


def client_ssl_context(
    ca: str | None = None, certfile: str | None = None, keyfile: str | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client TLS context that verifies the server (against ``ca`` if given)."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = check_hostname
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def server_ssl_context(certfile: str, keyfile: str, cafile: str | None) -> ssl.SSLContext:
    """A server TLS context; with ``cafile``, clients must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    if cafile:
        ctx.load_verify_locations(cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
