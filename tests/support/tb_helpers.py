"""Task functions that fail a few frames deep, for the remote-traceback tests
(tests/test_tracebacks.py): their file, lines and source must show in the client's traceback.

Each failing line carries a ``# marker: <name>`` comment so the tests find its number here
instead of hard-coding it.
"""

from __future__ import annotations


def entry(n: int) -> int:
    return middle(n) + 1  # marker: entry


def middle(n: int) -> int:
    doubled = 2 * n
    return innermost(doubled)  # marker: middle


def innermost(n: int) -> int:
    raise ValueError(f"innermost failed on {n}")  # marker: innermost


def rewrapped(n: int) -> int:
    try:
        return entry(n)
    except ValueError as exc:
        raise RuntimeError(f"entry({n}) failed") from exc  # marker: rewrapped
