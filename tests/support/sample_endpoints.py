"""Endpoints for tests: ``rpycsvc serve --endpoints tests.support.sample_endpoints``.

Also holds types the tests send by value (a dataclass, an exception that can't be
rebuilt) so both the test process and the server's workers can import them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import rpycsvc

from .rendezvous import WAIT, meet


@dataclass
class Point:
    x: float
    y: float

    def norm2(self) -> float:
        return self.x * self.x + self.y * self.y


class TwoArgError(Exception):
    """Pickles (as ``TwoArgError(message)``) but can't be rebuilt: ``__init__`` needs two."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")
        self.what = what
        self.why = why


@rpycsvc.endpoint
def add(a: Any, b: Any) -> Any:
    return a + b


@rpycsvc.endpoint
def describe(*args: Any, **kwargs: Any) -> tuple[str, ...]:
    """The type names of the arguments as the task sees them (a tuple: by value for rpyc)."""
    return (*(type(a).__name__ for a in args),
            *(f"{k}={type(v).__name__}" for k, v in sorted(kwargs.items())))


@rpycsvc.endpoint(name="worker_pid")
def _pid() -> int:
    return os.getpid()


@rpycsvc.endpoint(name="meet")
def meet_endpoint(port: int, timeout: float = WAIT) -> int:
    """The barrier (see tests.support.rendezvous) by name, for plain RPyC clients."""
    return meet(port, timeout)


@rpycsvc.endpoint
def fail(message: str) -> None:
    raise ValueError(message)


def not_an_endpoint() -> str:
    """Importable by path, but not registered by name."""
    return "by path"
