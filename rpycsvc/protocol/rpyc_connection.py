"""rpycsvc's RPyC connections: their protocol settings, a send that survives RPyC's cleanup
race, and a server connection whose replies may come later (so one connection runs many
tasks at once).

Why (RPyC 6.0.2, see shared/research/rpyc-facts.md): RPyC replies to a request in the
thread that received it, so a connection serves one request at a time. A service method
may return a :class:`Deferred`; the :class:`ServerConnection` then goes on reading requests
and the reply is sent when the deferred is resolved, from whichever thread resolves it.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from typing import Any

from rpyc.core import consts
from rpyc.core.protocol import Connection

from rpycsvc.errors import MessageTooLargeError
from rpycsvc.protocol.limits import HANDLE_TOO_LARGE, oversize

log = logging.getLogger("rpycsvc.server")

#: The RPyC protocol settings of rpycsvc's connections, on both ends.
PROTOCOL_CONFIG = {
    "allow_public_attrs": True,
    "sync_request_timeout": None,  # compute calls take as long as their tasks
    "include_local_traceback": True,
}


class Deferred:
    """A reply to be sent later. Return one from an exposed method of the rpycsvc service."""

    __slots__ = ("_conn", "_lock", "_outcome", "_seq")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: ServerConnection | None = None
        self._seq = 0
        self._outcome: tuple[bool, Any] | None = None

    def _bind(self, conn: ServerConnection, seq: int) -> None:
        with self._lock:
            self._conn, self._seq = conn, seq
            outcome = self._outcome
        if outcome is not None:
            conn._queue_reply(self, outcome)

    def resolve(self, value: Any) -> None:
        """Reply with ``value`` (boxed like any RPyC return value)."""
        self._settle((True, value))

    def fail(self, exc: BaseException) -> None:
        """Reply by raising ``exc`` in the caller."""
        self._settle((False, exc))

    def _settle(self, outcome: tuple[bool, Any]) -> None:
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = outcome
            bound = self._conn is not None
        if bound:
            conn = self._conn
            assert conn is not None
            conn._queue_reply(self, outcome)

    def _send(self, outcome: tuple[bool, Any]) -> None:
        """Box and send the reply (in the connection's reply sender thread)."""
        conn = self._conn
        assert conn is not None
        if conn.closed:
            return
        ok, value = _fit(outcome, getattr(conn._channel, "max_message", None))
        try:
            if ok:
                conn._send(consts.MSG_REPLY, self._seq, conn._box(value))
            else:
                conn._send(
                    consts.MSG_EXCEPTION, self._seq, conn._box_exc(type(value), value, None)
                )
        except (EOFError, OSError, ValueError, RuntimeError):
            # the client is gone (RuntimeError: rpyc's cleanup released its send lock under
            # us); nobody is waiting for this reply
            pass


def _fit(outcome: tuple[bool, Any], limit: Any) -> tuple[bool, Any]:
    """``outcome``, or in its place a :class:`MessageTooLargeError` if the reply would be
    over the message limit: the sender checks, so only this call fails, and the peer never
    sees a frame it would have to drop the connection for."""
    value = outcome[1]
    text = oversize(value, limit, "reply")
    if text is None:
        return outcome
    return False, MessageTooLargeError(text)


#: The connection whose request this thread is serving (for per-connection stdout).
CURRENT = threading.local()


class SendRaceSafe(Connection):
    """RPyC's ``_send`` without its race with ``_cleanup``.

    When a connection dies while one thread is sending a large message, the thread that
    reads the connection sees EOF first and runs RPyC's ``_cleanup``, which *releases the
    send lock the sender still holds*; the sender's own release then raises ``RuntimeError:
    release unlocked lock``, which hides the real cause (the peer is gone) from the caller.
    Here that error, on a connection that has closed, is reported as the ``EOFError`` it
    stands for (callers already turn ``EOFError`` into ``ServerLostError``)."""

    def _send(self, msg: int, seq: int, args: Any) -> None:
        try:
            super()._send(msg, seq, args)
        except RuntimeError as exc:
            if not self.closed:
                raise
            raise self._lost_while_sending() from exc

    def _lost_while_sending(self) -> BaseException:
        return EOFError("the connection closed while a message was being sent")


class ServerConnection(SendRaceSafe):
    """An RPyC connection whose exposed methods may answer later via :class:`Deferred`.

    Deferred replies are sent by a thread of this connection's own (started with the
    first one), never by the thread that resolves them: that is often a thread shared by
    all clients (the worker pool's reader), and a client that doesn't read (frozen, or on
    a dead link) would block it in ``sendall`` and stop every other client's results.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._replies: queue.SimpleQueue[tuple[Deferred, tuple[bool, Any]] | None] = \
            queue.SimpleQueue()
        self._reply_lock = threading.Lock()
        self._reply_thread: threading.Thread | None = None
        super().__init__(*args, **kwargs)

    def _queue_reply(self, deferred: Deferred, outcome: tuple[bool, Any]) -> None:
        """Have the reply sender send ``deferred``'s reply; returns at once."""
        with self._reply_lock:
            if self._reply_thread is None:
                if self.closed:
                    return  # nobody is waiting for it
                self._reply_thread = threading.Thread(
                    target=self._send_replies, name="rpycsvc-replies", daemon=True)
                self._reply_thread.start()
        self._replies.put((deferred, outcome))

    def _send_replies(self) -> None:
        replies = self._replies
        while True:
            item = replies.get()
            if item is None or self.closed:
                return
            deferred, outcome = item
            del item
            try:
                deferred._send(outcome)
            except Exception:  # one reply that can't be boxed must not stop the others
                log.exception("could not send a reply")
            del deferred, outcome  # a large result is freed as soon as it is sent

    def _cleanup(self, _anyway: bool = True) -> None:
        try:
            super()._cleanup(_anyway)
        finally:
            self._replies.put(None)  # ends the reply sender (closing woke a blocked send)

    def _dispatch_request(self, seq: int, raw_args: Any) -> None:
        # A well-formed request: a plain RPyC peer on a server without authkey has now said
        # its hello, so its messages may be full-size from here on.
        channel = self._channel
        if not getattr(channel, "trusted", True):
            channel.trust()
        outer = getattr(CURRENT, "conn", None)
        CURRENT.conn = self
        try:
            self._dispatch_request_here(seq, raw_args)
        finally:
            CURRENT.conn = outer

    def _dispatch_request_here(self, seq: int, raw_args: Any) -> None:
        try:
            handler, args = raw_args
            if handler == HANDLE_TOO_LARGE:  # put in place of a request over the limit
                raise MessageTooLargeError(str(args))
            args = self._unbox(args)
            res = self._HANDLERS[handler](self, *args)
        except BaseException:
            t, v, tb = sys.exc_info()
            self._last_traceback = tb
            if t is SystemExit and self._config["propagate_SystemExit_locally"]:
                raise
            if t is KeyboardInterrupt and self._config["propagate_KeyboardInterrupt_locally"]:
                raise
            self._send(consts.MSG_EXCEPTION, seq, self._box_exc(t, v, tb))
        else:
            if isinstance(res, Deferred):
                res._bind(self, seq)
            else:
                self._send(consts.MSG_REPLY, seq, self._box(res))
