"""A tiny class for the hosted-object tests (``--service tests.support.shopmod:Counter``)."""

from __future__ import annotations


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def bump(self) -> int:
        self.n += 1
        return self.n
