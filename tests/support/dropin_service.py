"""A hosted class written the way RPyC's docs write services (``exposed_`` methods), for
``--service tests.support.dropin_service:Tally`` in tests/test_dropin_classic.py."""

from __future__ import annotations


class Tally:
    def __init__(self) -> None:
        self.total = 0

    def exposed_add(self, n: int) -> int:
        self.total += n
        return self.total
