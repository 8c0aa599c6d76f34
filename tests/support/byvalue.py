"""Fixtures and checks that several test modules share.

``tasks_by_value``: import it into a test module (``from tests.support.byvalue import
tasks_by_value  # noqa: F401``) and the module's functions are pickled by value for as
long as its tests run — a deployed server, a server of another Python or one started
elsewhere can't import the test module, so its task functions must travel whole."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest

GiB = 1 << 30


@pytest.fixture(scope="module", autouse=True)
def tasks_by_value(request: pytest.FixtureRequest) -> Iterator[None]:
    module = sys.modules[request.module.__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 where there is none to read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def needs_memory(gib: int) -> Any:
    """Skip a test unless about ``gib`` GiB of memory are available."""
    return pytest.mark.skipif(available_memory() < gib * GiB,
                              reason=f"needs ~{gib} GiB of available memory (MemAvailable)")
