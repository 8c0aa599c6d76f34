"""The inbound budget: a server-wide bound on the bytes of messages being received at once,
taken a piece at a time as they arrive and given back when a message is complete."""

from __future__ import annotations

import itertools
import threading


class Reservation:
    """What one message being received holds of an :class:`InboundBudget`."""

    __slots__ = ("held", "ticket")

    def __init__(self, ticket: int) -> None:
        self.ticket = ticket  # messages that started earlier have smaller tickets
        self.held = 0


class InboundBudget:
    """A server-wide budget of inbound bytes being received at once.

    A reader takes each piece of a message from the budget before reading it (so a peer
    that announces a large message and sends nothing holds nothing) and gives the whole
    message back when it is complete. When the budget is spent, an authenticated peer is
    simply not read from until room frees up (TCP backpressure: its sends block), and a
    peer that hasn't authenticated is refused instead.

    Readers waiting for room mid-message could wait for each other forever; when every
    reader holding a part of the budget waits, the one whose message started first goes
    on. So memory stays within ``total`` plus one message of the largest size (plus up to
    :data:`~rpycsvc.protocol.limits.SMALL_MESSAGE` per connection: small messages don't
    use the budget, so they keep flowing while large ones wait). A reader whose peer sends
    nothing for the channel's ``stall_timeout`` while holding a part is dropped, which
    gives it back: a stalled peer holds the budget for a bounded time, not forever.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.refused = 0  # pieces refused to peers that have not authenticated
        self.waits = 0  # times an authenticated reader had to wait for room
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._holders = 0  # messages holding a part of the budget
        self._stuck: list[Reservation] = []  # of those, the ones waiting for more

    def start(self) -> Reservation:
        """A new message, holding nothing yet."""
        return Reservation(next(self._tickets))

    def take(self, res: Reservation, n: int, *, wait: bool) -> bool:
        """Add ``n`` bytes to ``res``; False if they can't be had now and ``wait`` is off.
        With ``wait``, blocks until they can (see the class docstring)."""
        with self._cond:
            if self.used + n > self.total:
                if not wait:
                    self.refused += 1
                    return False
                self.waits += 1
                if res.held:
                    self._stuck.append(res)
                    self._cond.notify_all()  # perhaps every holder waits now
                try:
                    self._cond.wait_for(lambda: self.used + n <= self.total
                                        or self._goes_first(res))
                finally:
                    if res.held:
                        self._stuck.remove(res)
            if not res.held:
                self._holders += 1
            res.held += n
            self.used += n
            return True

    def _goes_first(self, res: Reservation) -> bool:
        stuck = self._stuck
        return bool(res.held) and len(stuck) == self._holders \
            and res.ticket == min(r.ticket for r in stuck)

    def finish(self, res: Reservation) -> None:
        """The message is complete (or abandoned): give back all it held."""
        if res.held:
            with self._cond:
                self.used -= res.held
                self._holders -= 1
                res.held = 0
                self._cond.notify_all()
