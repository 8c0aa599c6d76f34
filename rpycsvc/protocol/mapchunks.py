"""A map chunk as it travels: its items one way, their results (or errors) back.

``Cluster.map`` sends its input in chunks, one task each (task option ``chunk``). Both ends
of the format are here, so that they change together:

- the client packs a chunk with :func:`pack_items`: a ``range`` slice when the map's input is
  one ``range`` (a few bytes, whatever its length), the items themselves when it maps one
  iterable, argument tuples only when it maps several (``fn(*args)``);
- the worker runs it with :func:`run_chunk`: ``map(fn, items)`` in C, no per-item ``try`` or
  result tuple; an item that raised is recorded by its index and the rest still run;
- the client reads the reply with :func:`chunk_results`: the results in a plain list (one
  pickle opcode per result, no ``(ok, value)`` pair per item) and the errors by index; a
  map hands them on without Python code per result (see ``rpycsvc.client.map_results``).

This format replaced a list of argument tuples in, a list of ``(ok, value)`` pairs out
(task option ``batch``, still what thread-mode chunks use): pickling, unpickling and
walking those pairs was most of a map's per-item cost on the client (issue 15).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, Callable

from rpycsvc.protocol.serialization import Frames, dumps, loads
from rpycsvc.protocol.tracebacks import dump_exception

#: The first element of a packed chunk: the format's version. A worker that finds another
#: value refuses the chunk with an error that says so, rather than misreading it.
FORMAT = "mapchunk-1"


def pack_items(items: Sequence[Any], star: bool) -> tuple[str, Sequence[Any], bool]:
    """What a chunk's task carries (pickled by the caller): ``items`` is a ``range``, a list
    of items (``fn(item)``) or, with ``star``, a list of argument tuples (``fn(*args)``)."""
    return (FORMAT, items, star)


def run_chunk(fn: Callable[..., Any], data: Sequence[bytes | bytearray]) -> Frames:
    """Run a chunk packed by :func:`pack_items` (on the worker); its reply's frames.

    Each item keeps its own outcome, as if it were a task of its own: an item that raises
    (anything, as a task's ``SystemExit`` would be) is recorded by its index and the next
    items still run. The reply is ``(results, {index: exception frames})``."""
    packed = loads(data, "map chunk", writable=False)
    if not (isinstance(packed, tuple) and len(packed) == 3 and packed[0] == FORMAT):
        got = packed[0] if isinstance(packed, tuple) and packed else type(packed).__name__
        raise ValueError(f"this worker reads map chunks of format {FORMAT!r}, got {got!r}: "
                         "the client and the server run different rpycsvc versions")
    _, items, star = packed
    source = iter(items)
    results: list[Any] = []
    errors: dict[int, Frames] = {}
    total = len(items)
    while True:
        try:
            # (extend keeps what it appended before an item raised; the iterator has moved
            # past that item, so the loop goes on with the next one)
            results.extend(itertools.starmap(fn, source) if star else map(fn, source))
        except BaseException as exc:
            errors[len(results)] = dump_exception(exc)
        else:
            if len(results) >= total:
                break
            # an item raised StopIteration, which ended map() as if the input had: its
            # exception itself is lost, so it gets one that says what happened
            errors[len(results)] = dump_exception(StopIteration(
                f"the task raised StopIteration on item {len(results)} of its chunk"))
        results.append(None)
    try:
        return dumps((results, errors), "map results")
    except Exception:  # some result can't travel: that item fails, the others are sent
        for i, value in enumerate(results):
            if i not in errors:
                try:
                    dumps(value, "result")
                except Exception as exc:
                    errors[i] = dump_exception(exc)
                    results[i] = None
        return dumps((results, errors), "map results")


#: The marker that ends a chunk's results (see :func:`chunk_queue`).
END = object()


def chunk_results(reply: Any) -> tuple[Iterator[Any], Frames | None]:
    """A chunk's reply (unpickled) as an iterator over its results up to its first item
    that raised, and that item's exception frames (None if none raised; the items after it
    are not read: a map stops at its first error, as ``Executor.map`` does).

    The iterator is C code per item (the common case has no Python code per result) and
    keeps no reference to a result it has yielded (a map's results may be big). Also reads
    the older reply of ``batch`` chunks (a list of ``(ok, value)`` pairs, thread mode)."""
    queue, failed = chunk_queue(reply)
    return iter(queue.popleft, END), failed


def chunk_queue(reply: Any) -> tuple[deque[Any], Frames | None]:
    """As :func:`chunk_results`, with the results in a deque that ends with a marker:
    ``iter(queue.popleft, END)`` yields them, and :func:`end_early` stops that early."""
    if isinstance(reply, list):
        first = next((i for i, (ok, _) in enumerate(reply) if not ok), None)
        failed = None if first is None else reply[first][1]
        values = [value for _, value in reply[:first]]
        reply.clear()
    else:
        values, errors = reply
        first = min(errors) if errors else None
        failed = None if first is None else errors[first]
        if first is not None:
            del values[first:]
    queue: deque[Any] = deque(values)
    values.clear()  # (the reply's own list, which its future holds: it would keep them alive)
    queue.append(END)
    return queue, failed


def end_early(queue: deque[Any]) -> None:
    """Make the iterator over ``queue`` (see :func:`chunk_queue`) yield nothing more, and
    let go of the results it still holds (a map closed in the middle of a chunk)."""
    queue.clear()
    queue.append(END)
