"""Map chunks as they travel (rpycsvc.protocol.mapchunks, issue 15): a ``range`` input as
range slices, one iterable's items without argument tuples, several iterables zipped; results
as a plain list with errors by index. Each item keeps its own outcome, as a task of its own
would: the items after one that raised still run, in the same chunk.

The end-to-end tests use real servers (``Cluster.local``); the format's two ends are also
run directly, the worker's end (:func:`run_chunk`) in this process."""

from __future__ import annotations

import operator
import pickle
import weakref
from collections.abc import Iterator

import pytest

from rpycsvc import Cluster
from rpycsvc.errors import SerializationError
from rpycsvc.protocol.mapchunks import chunk_results, pack_items, run_chunk
from rpycsvc.protocol.serialization import dumps, loads
from rpycsvc.protocol.tracebacks import load_exception


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster.local(2, workers=1, output="capture") as c:
        yield c


def _run(fn: object, items: object, star: bool = False) -> tuple[list[object], dict]:
    """A chunk through both ends of the format: packed and pickled as the client sends it,
    run as the worker runs it, the reply unpickled as the client reads it."""
    reply = run_chunk(fn, dumps(pack_items(items, star)))  # type: ignore[arg-type]
    values, errors = loads(reply)
    return values, errors


def _fails_on_sevens(x: int) -> int:
    if x % 10 == 7:
        raise ValueError(f"bad {x}")
    return x * 2


class _Box:
    """Something a weak reference can watch (``object()`` can't be)."""


def _stops_on_three(x: int) -> int:
    if x == 3:
        raise StopIteration("three")
    return x


# -- the format, both ends -------------------------------------------------------------------

def test_a_range_travels_as_a_range_not_as_its_items() -> None:
    small = dumps(pack_items(range(0, 10_000_000), False))
    assert sum(len(f) for f in small) < 200
    values, errors = _run(abs, range(-3, 3))
    assert values == [3, 2, 1, 0, 1, 2] and errors == {}


def test_each_item_keeps_its_own_error_and_the_rest_still_run() -> None:
    values, errors = _run(_fails_on_sevens, list(range(30)))
    assert sorted(errors) == [7, 17, 27]
    assert [v for i, v in enumerate(values) if i not in errors] == \
        [x * 2 for x in range(30) if x % 10 != 7]
    exc = load_exception(errors[17], "here")
    assert isinstance(exc, ValueError) and "bad 17" in str(exc)


def test_an_item_raising_stop_iteration_fails_alone() -> None:
    # (map() would take it for the end of the input: the chunk must not end early)
    values, errors = _run(_stops_on_three, range(6))
    assert list(errors) == [3]
    assert isinstance(load_exception(errors[3], "here"), StopIteration)
    assert [values[i] for i in (0, 1, 2, 4, 5)] == [0, 1, 2, 4, 5]


def test_several_iterables_call_with_several_arguments() -> None:
    values, errors = _run(operator.add, [(1, 2), (3, 4)], star=True)
    assert values == [3, 7] and errors == {}


def test_a_result_that_cannot_travel_fails_alone() -> None:
    def lock_on_two(x: int) -> object:
        import threading

        return threading.Lock() if x == 2 else x

    values, errors = _run(lock_on_two, range(4))
    assert list(errors) == [2]
    assert isinstance(load_exception(errors[2], "here"), SerializationError)
    assert [values[i] for i in (0, 1, 3)] == [0, 1, 3]


def test_a_chunk_of_another_format_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="different rpycsvc versions"):
        run_chunk(abs, (pickle.dumps(("mapchunk-0", [1], False)),))


def test_reading_the_results_stops_at_the_item_that_failed() -> None:
    values, failed = chunk_results(_run(_fails_on_sevens, range(20)))
    assert list(values) == [0, 2, 4, 6, 8, 10, 12]
    assert failed is not None
    assert "bad 7" in str(load_exception(failed, "here"))
    values, failed = chunk_results(_run(abs, range(-2, 2)))
    assert list(values) == [2, 1, 0, 1] and failed is None


def test_reading_the_results_keeps_none_of_them() -> None:
    results: list[object] = [_Box() for _ in range(3)]
    values, _ = chunk_results((results, {}))
    assert results == []  # the reply's list is emptied: the future holding it holds nothing
    first = next(values)
    ref = weakref.ref(first)
    del first
    assert ref() is None  # (yielded: not kept)
    assert len(list(values)) == 2


def test_the_batch_reply_of_thread_mode_reads_the_same() -> None:
    values, failed = chunk_results([(True, 1), (True, 2), (False, ("frames",)), (True, 4)])
    assert list(values) == [1, 2] and failed == ("frames",)


# -- end to end, automatic chunks --------------------------------------------------------------

def test_map_of_a_range_in_automatic_chunks(cluster: Cluster) -> None:
    n = 50_000
    assert list(cluster.map(abs, range(-n, n, 3), timeout=120)) == \
        [abs(x) for x in range(-n, n, 3)]
    assert list(cluster.map(abs, range(0))) == []
    huge = cluster.map(abs, range(10**20), timeout=120)  # (len() would overflow)
    assert [next(huge) for _ in range(5)] == [0, 1, 2, 3, 4]
    huge.close()


def test_map_of_a_generator_and_of_several_iterables(cluster: Cluster) -> None:
    n = 20_000
    assert list(cluster.map(str, (x for x in range(n)), timeout=120)) == \
        [str(x) for x in range(n)]
    # (zip semantics: the shortest input ends the map)
    assert list(cluster.map(operator.mul, range(n), iter(range(n - 5)), timeout=120)) == \
        [x * x for x in range(n - 5)]


def test_map_raises_at_the_failing_item_of_a_big_chunk(cluster: Cluster) -> None:
    it = cluster.map(_fails_on_sevens, range(5000), timeout=120)
    assert [next(it) for _ in range(7)] == [0, 2, 4, 6, 8, 10, 12]
    with pytest.raises(ValueError, match="bad 7") as info:
        next(it)
    assert "bad 7" in info.value.remote_traceback  # type: ignore[attr-defined]
    it = cluster.map(_stops_on_three, range(5000), timeout=120)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError) as stopped:  # (PEP 479: as any generator raising it)
        next(it)
    assert isinstance(stopped.value.__cause__, StopIteration)


def test_a_map_closed_in_the_middle_of_a_chunk_yields_nothing_more(cluster: Cluster) -> None:
    """close() ends the results as a generator's close() does, also those of the chunk
    being read (found in review: the rest of that chunk still came)."""
    it = cluster.map(abs, range(5000), chunksize=5000, timeout=120)
    assert [next(it) for _ in range(10)] == list(range(10))
    it.close()
    with pytest.raises(StopIteration):
        next(it)
    assert list(it) == []


def test_thread_mode_map_keeps_its_batch_format(cluster: Cluster) -> None:
    it = cluster.options(mode="thread").map(_fails_on_sevens, range(20), timeout=120)
    assert [next(it) for _ in range(7)] == [0, 2, 4, 6, 8, 10, 12]
    with pytest.raises(ValueError, match="bad 7"):
        next(it)
    assert list(cluster.options(mode="thread").map(operator.add, range(5), range(5))) == \
        [0, 2, 4, 6, 8]


def test_big_results_make_small_chunks() -> None:
    from rpycsvc.client.mapping import MAX_CHUNK, MAX_CHUNK_BYTES, ChunkSizer

    sizer = ChunkSizer(None, workers=2, total=None)
    sizer.observe(64, 64 * 1e-7)  # cheap items...
    sizer.observe(4096, 4096 * 1e-7)
    assert sizer.next_size(0) == MAX_CHUNK
    sizer.observe(4096, 4096 * 1e-7, 4096 << 20)  # ...whose results are a MiB each
    assert sizer.next_size(0) == MAX_CHUNK_BYTES >> 20


def test_map_of_big_results_in_automatic_chunks(cluster: Cluster) -> None:
    # cheap items with 256 KiB results (chunks cut by their results' bytes) all come back
    sizes = [len(b) for b in cluster.map(bytes, [256 << 10] * 200, timeout=120)]
    assert sizes == [256 << 10] * 200


def test_an_input_that_raises_ends_the_map_after_the_items_before_it(cluster: Cluster) -> None:
    """As the builtin ``map``: the results of the items the input gave come first, then its
    error (before, the error came at once and the results already computed were lost)."""
    def items() -> Iterator[int]:
        yield from range(1000)
        raise KeyError("the input broke")

    got: list[int] = []
    with pytest.raises(KeyError, match="the input broke"):
        for r in cluster.map(operator.neg, items()):
            got.append(r)
    assert got == [-x for x in range(1000)]
    assert list(cluster.map(operator.neg, range(3))) == [0, -1, -2]  # the cluster goes on
