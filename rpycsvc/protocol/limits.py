"""Limits on what a peer may send: message sizes before and after it is trusted, how long it
may stall mid-message, the sender's check that a message fits the receiver's limit, and the
error text that names the setting."""

from __future__ import annotations

from typing import Any

#: The most an RPyC frame header can announce (its length field has 32 bits).
WIRE_MAX = 0xFFFFFFFF
#: Largest message from a peer that has not yet authenticated (with an authkey) or said a
#: valid hello (without one): a hello or a first request is a few hundred bytes.
PREAUTH_MAX_MESSAGE = 64 << 10
#: Headroom a sender keeps below the receiver's limit for RPyC's and brine's framing.
MESSAGE_OVERHEAD = 64 << 10
#: The setting that bounds messages, as the CLI and the environment spell it.
MESSAGE_SETTING = "--max-message-size (RPYCSVC_MAX_MESSAGE_SIZE)"
#: Messages up to this size are read without waiting for the inbound budget: they cost at
#: most this much per connection (one message is read at a time per connection), and they
#: keep flowing (calls, replies, hellos, a plain client's first request) while large
#: messages wait for room, e.g. behind a peer that stalled in the middle of a large one.
SMALL_MESSAGE = PREAUTH_MAX_MESSAGE
#: Default seconds a peer may send nothing in the middle of a message that holds a part of
#: the inbound budget before it is dropped and its part freed (``--stall-timeout``).
DEFAULT_STALL_TIMEOUT = 30.0
#: The setting that bounds such a stall, as the CLI and the environment spell it.
STALL_SETTING = "--stall-timeout (RPYCSVC_STALL_TIMEOUT)"

#: A request handler number RPyC doesn't use: the
#: :class:`~rpycsvc.protocol.channel.FastChannel` puts it in place of a request over the
#: message limit (its argument is the error text), and the
#: :class:`~rpycsvc.protocol.rpyc_connection.ServerConnection` answers it with
#: :class:`~rpycsvc.errors.MessageTooLargeError`.
HANDLE_TOO_LARGE = 250


def format_size(n: int) -> str:
    """``2147483648`` → ``"2 GiB"``, ``5000`` → ``"5000 bytes"`` (exact units only)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def too_large_message(what: str, size: int, limit: int) -> str:
    """The text of a :class:`~rpycsvc.errors.MessageTooLargeError`: the size, the limit,
    the setting, and what to do about it."""
    return (f"the {what} of this task ({size} bytes) would be over the server's message limit "
            f"of {format_size(limit)} ({limit} bytes, set by {MESSAGE_SETTING}; "
            f"{format_size(MESSAGE_OVERHEAD)} of it is kept for framing). Raise the limit on "
            "the server, or send less at once (split the data, or have the task read or write "
            "it elsewhere)")


def payload_size(obj: Any, depth: int = 4) -> int:
    """Bytes of the ``bytes``/``str`` data in ``obj`` and the tuples holding it (shallow):
    what a message carrying ``obj`` costs, less its small framing."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return memoryview(obj).nbytes
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, tuple) and depth > 0:
        return sum(payload_size(x, depth - 1) for x in obj)
    return 0


def oversize(payload: Any, limit: Any, what: str = "arguments") -> str | None:
    """The sender's check: an error text if a message carrying ``payload`` would be over
    ``limit`` bytes (the receiver's limit, headroom for framing included); None if it fits
    or ``limit`` is unknown. Checked before anything is sent, so only this task fails and
    the connection stays as it was."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    size = payload_size(payload)
    if size + MESSAGE_OVERHEAD <= limit:
        return None
    return too_large_message(what, size, limit)
