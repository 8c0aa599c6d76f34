"""Compute endpoints through rpycsvc.connect: functions by value, import paths, endpoint
names, and arguments/results that arrive as real objects, never netrefs."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from rpyc.core.netref import BaseNetref

import rpycsvc
from tests.support.sample_endpoints import Point
from tests.support.servers import running_server

ENDPOINTS = "tests.support.sample_endpoints"


@pytest.fixture(scope="module")
def server() -> Iterator[rpycsvc.Server]:
    """Overrides conftest's server: the same, with the sample endpoints registered."""
    with running_server(endpoints=[ENDPOINTS]) as srv:
        yield srv


def square_plus(x: int, extra: int = 0) -> int:
    """A function defined in this test module: it travels by reference, the worker imports us."""
    return x * x + extra


@dataclass
class Box:
    label: str
    items: list[int]


def kinds(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """What the task receives: the type of each argument, and whether any is a netref."""
    values = [*args, *kwargs.values()]
    return {
        "types": [type(v).__name__ for v in values],
        "netrefs": [isinstance(v, BaseNetref) for v in values],
        "pid": os.getpid(),
    }


def assert_no_netrefs(obj: Any, depth: int = 0) -> None:
    assert not isinstance(obj, BaseNetref), f"got a netref: {type(obj)!r}"
    assert depth < 20
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert_no_netrefs(k, depth + 1)
            assert_no_netrefs(v, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            assert_no_netrefs(v, depth + 1)


# -- what a task can be ------------------------------------------------------------------------

def test_lambda_by_value(client: rpycsvc.Client) -> None:
    assert client.compute(lambda x, y: x * y, 6, 7) == 42


def test_closure_by_value(client: rpycsvc.Client) -> None:
    base = {"offset": 100}
    factor = 3

    def scaled(x: int) -> int:
        return x * factor + base["offset"]

    assert client.compute(scaled, 5) == 115


def test_function_defined_in_test_module(client: rpycsvc.Client) -> None:
    assert client.compute(square_plus, 4, extra=1) == 17


def test_task_runs_in_a_worker_not_in_the_server(client: rpycsvc.Client,
                                                 server: rpycsvc.Server) -> None:
    pid = client.compute(os.getpid)
    assert pid != os.getpid()  # the in-process server runs in the test process
    assert pid in client.stats()["worker_pids"]


def test_import_path(client: rpycsvc.Client) -> None:
    assert client.compute("math:factorial", 5) == 120
    assert client.compute("tests.support.sample_endpoints:not_an_endpoint") == "by path"
    assert client.compute("os.path:join", "a", "b") == os.path.join("a", "b")


def test_registered_endpoint_by_name(client: rpycsvc.Client) -> None:
    assert client.compute("add", 2, 3) == 5
    assert client.compute("add", [1], [2]) == [1, 2]
    pid = client.compute("worker_pid")
    assert pid in client.stats()["worker_pids"]


def test_unknown_endpoint_names_the_known_ones(client: rpycsvc.Client) -> None:
    with pytest.raises(LookupError) as info:
        client.compute("no_such_endpoint", 1)
    assert "no_such_endpoint" in str(info.value)
    assert "add" in str(info.value)  # says what the server does offer


def test_bad_import_path_says_what_failed(client: rpycsvc.Client) -> None:
    with pytest.raises(rpycsvc.ConfigError, match="no_such_module_xyz"):
        client.compute("no_such_module_xyz:f")
    with pytest.raises(rpycsvc.ConfigError, match="has no 'nope'"):
        client.compute("math:nope")


def test_root_compute_on_rpycsvc_client(client: rpycsvc.Client) -> None:
    assert client.root.compute(lambda: "by value") == "by value"
    assert client.root.compute("math:factorial", 6) == 720
    assert client.root.compute("add", 1, b=2) == 3
    assert client.root.compute(square_plus, 3) == 9


def test_submit_returns_a_concurrent_future(client: rpycsvc.Client) -> None:
    import concurrent.futures

    futures = [client.submit(math.factorial, n) for n in range(8)]
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)
    _done, not_done = concurrent.futures.wait(futures, timeout=30)
    assert not not_done
    assert [f.result(timeout=0) for f in futures] == [math.factorial(n) for n in range(8)]


# -- arguments and results by value ------------------------------------------------------------

def test_containers_arrive_as_real_objects(client: rpycsvc.Client) -> None:
    seen = client.compute(kinds, [1, 2], {"a": 1}, {1, 2}, (1, [2]), frozenset({3}),
                          bytearray(b"xy"), named={"k": [1]})
    assert seen["types"] == ["list", "dict", "set", "tuple", "frozenset", "bytearray", "dict"]
    assert seen["netrefs"] == [False] * 7


@pytest.mark.parametrize(
    "value",
    [
        [1, "two", 3.0, None],
        {"a": [1, 2], "b": {"c": (3, 4)}},
        {1, 2, 3},
        frozenset({"x"}),
        bytearray(b"\x00\xff" * 10),
        [[i, {"sq": i * i}] for i in range(1000)],
    ],
    ids=["list", "dict", "set", "frozenset", "bytearray", "nested"],
)
def test_results_by_value(client: rpycsvc.Client, value: Any) -> None:
    result = client.compute(lambda v: v, value)
    assert type(result) is type(value)
    assert result == value
    assert_no_netrefs(result)


def test_list_dict_set_types_exactly(client: rpycsvc.Client) -> None:
    lst, dct, st = client.compute(lambda: ([1, 2], {"k": "v"}, {3}))
    assert type(lst) is list and type(dct) is dict and type(st) is set
    assert_no_netrefs((lst, dct, st))


def test_numpy_array_in_and_out(client: rpycsvc.Client) -> None:
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    seen = client.compute(kinds, a)
    assert seen["types"] == ["ndarray"] and seen["netrefs"] == [False]
    out = client.compute(lambda x: x * 2, a)
    assert type(out) is np.ndarray
    assert out.dtype == np.float64 and out.shape == (3, 4)
    np.testing.assert_array_equal(out, a * 2)
    assert out.flags.writeable
    assert not isinstance(out, BaseNetref)


def test_dataclass_in_and_out(client: rpycsvc.Client) -> None:
    p = Point(3.0, 4.0)
    assert client.compute(Point.norm2, p) == 25.0
    moved = client.compute(lambda q: Point(q.x + 1, q.y + 1), p)
    assert type(moved) is Point
    assert moved == Point(4.0, 5.0)
    box = client.compute(lambda b: Box(b.label.upper(), [*b.items, 4]), Box("x", [1, 2, 3]))
    assert type(box) is Box and box == Box("X", [1, 2, 3, 4])
    assert type(box.items) is list


def test_dataclass_defined_in_test_function(client: rpycsvc.Client) -> None:
    @dataclass
    class Local:
        n: int

    out = client.compute(lambda v: Local(v.n * 10), Local(4))
    assert out.n == 40
    assert type(out).__name__ == "Local"
    assert not isinstance(out, BaseNetref)


def test_kwargs_by_value(client: rpycsvc.Client) -> None:
    out = client.compute(lambda **kw: {k: type(v).__name__ for k, v in kw.items()},
                         a=[1], b={"x": 1}, c={1}, d=np.zeros(3))
    assert out == {"a": "list", "b": "dict", "c": "set", "d": "ndarray"}


def test_unpicklable_argument_is_refused_clearly(client: rpycsvc.Client) -> None:
    import threading

    with pytest.raises(rpycsvc.SerializationError, match="argument"):
        client.compute(lambda x: x, threading.Lock())


def test_unpicklable_result_is_reported(client: rpycsvc.Client) -> None:
    with pytest.raises(rpycsvc.SerializationError, match="result"):
        client.compute(lambda: __import__("threading").Lock())
    assert client.compute(lambda: "still serving") == "still serving"
