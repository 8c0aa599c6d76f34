"""A task call as it travels: the call encoded into frames, the server's reply decoded.

:func:`frames_of_call` pickles a call (functions by value, names as text);
:func:`decode_reply` turns a server's reply into a result or the exception to raise (the
server's own refusals rebuilt as rpycsvc's errors); :func:`settle_reply` completes a
future from a reply. A connection and a cluster's scheduler both use them.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from rpycsvc.client.future import settle
from rpycsvc.errors import (
    ConfigError,
    MessageTooLargeError,
    RemoteTaskError,
    RpycsvcError,
    SerializationError,
    ServerDrainingError,
    ServerLostError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from rpycsvc.protocol.serialization import dumps, dumps_function, loads
from rpycsvc.protocol.tracebacks import load_exception

_ERRORS: dict[str, type[Exception]] = {
    "TaskTimeoutError": TaskTimeoutError,
    "WorkerCrashedError": WorkerCrashedError,
    "TaskCancelledError": TaskCancelledError,
    "ConfigError": ConfigError,
    "SerializationError": SerializationError,
    "MessageTooLargeError": MessageTooLargeError,
    "ServerDrainingError": ServerDrainingError,
    "ServerLostError": ServerLostError,
}


def frames_of_call(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   copy: bool = True) -> tuple[str, Any, tuple[bytes, ...]]:
    """How a call travels: (kind, spec, frames) — functions pickled by value, names as text.

    With ``copy=False`` large buffers stay views of the arguments (see ``dumps``)."""
    data = dumps((args, kwargs), "arguments", copy=copy)
    if isinstance(task, str):
        return ("path" if ":" in task else "endpoint"), task, data
    return "pickled", None, (dumps_function(task), *data)


def decode_reply(reply: Any, address: str) -> tuple[bool, Any]:
    """Turn a server reply into ``(True, result)`` or ``(False, exception)``."""
    status = reply[0]
    if status == "ok":  # (frames come as the worker sent them: numpy buffers writable)
        return True, loads(reply[1], "result", writable=False)
    if status == "raised":
        return False, load_exception(reply[1], address)
    cls = _ERRORS.get(reply[1])
    if cls is None:
        return False, RemoteTaskError(reply[2], remote_type=reply[1], address=address)
    exc = cls(f"{reply[2]} (on {address})")
    if hasattr(exc, "address"):
        exc.address = address
    return False, exc


def settle_reply(fut: Future, reply: Any, address: str) -> None:
    """Complete ``fut`` from a server's reply to ``run``."""
    try:
        ok, result = decode_reply(reply, address)
    except RpycsvcError as exc:
        ok, result = False, exc
    settle(fut, result if ok else None, None if ok else result)
