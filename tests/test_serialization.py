"""rpycsvc.protocol.serialization without sockets: values by value, buffers out of band, errors
rebuilt; plus one round trip of large buffers through a live server."""

from __future__ import annotations

import pickle
import sys
from typing import Any

import numpy as np
import pytest
from rpyc.core import brine

import rpycsvc
from rpycsvc.protocol.serialization import (
    OOB_THRESHOLD,
    FunctionCache,
    dump_exception,
    dumps,
    dumps_function,
    load_exception,
    loads,
)
from tests.support.sample_endpoints import Point, TwoArgError

BIG = OOB_THRESHOLD * 2  # bytes: comfortably above the out-of-band threshold


def roundtrip(value: Any) -> tuple[Any, tuple[bytes, ...]]:
    frames = dumps(value, "test value")
    return loads(frames, "test value"), frames


def assert_same_array(got: Any, want: np.ndarray) -> None:
    assert type(got) is np.ndarray
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# -- frames ------------------------------------------------------------------------------------

def test_frames_are_a_tuple_of_bytes_that_rpyc_sends_by_value() -> None:
    frames = dumps({"a": np.zeros(BIG // 8), "b": [1, 2]})
    assert type(frames) is tuple
    assert all(type(f) is bytes for f in frames)
    assert brine.dumpable(frames)  # brine: by value, never a netref


def test_small_values_travel_in_one_frame() -> None:
    value = {"list": [1, 2], "arr": np.arange(10), "bytes": b"x" * 100}
    got, frames = roundtrip(value)
    assert len(frames) == 1
    assert got["list"] == [1, 2] and got["bytes"] == b"x" * 100
    assert_same_array(got["arr"], np.arange(10))


# -- bytes-like values ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 10, BIG], ids=["empty", "small", "big"])
def test_bytes_roundtrip(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"\x00" * (size % 256)
    got, _ = roundtrip(data)
    assert type(got) is bytes and got == data


@pytest.mark.parametrize("size", [0, 10, BIG], ids=["empty", "small", "big"])
def test_bytearray_roundtrip(size: int) -> None:
    data = bytearray(range(256)) * (size // 256)
    got, _ = roundtrip(data)
    assert type(got) is bytearray and got == data
    got[:0] = b"writable"  # still a mutable bytearray


@pytest.mark.parametrize("size", [10, BIG], ids=["small", "big"])
def test_memoryview_roundtrip(size: int) -> None:
    source = bytearray(b"0123456789abcdef" * (size // 16 + 1))[:size]
    got, frames = roundtrip(memoryview(source))
    assert type(got) is memoryview
    assert got.tobytes() == bytes(source)
    if size >= OOB_THRESHOLD:
        assert len(frames) == 2 and len(frames[1]) == size  # out of band, not in the pickle


def test_memoryview_keeps_format_and_shape() -> None:
    arr = np.arange(BIG // 8, dtype=np.float64).reshape(-1, 16)
    got, frames = roundtrip(memoryview(arr))
    assert type(got) is memoryview
    assert got.format == "d" and got.shape == arr.shape
    np.testing.assert_array_equal(np.asarray(got), arr)
    assert len(frames) == 2


def test_noncontiguous_memoryview_roundtrip() -> None:
    source = memoryview(bytes(range(256)) * 1024)[::3]
    assert not source.c_contiguous
    got, _ = roundtrip(source)
    assert type(got) is memoryview
    assert got.tobytes() == source.tobytes()


def test_buffers_inside_containers() -> None:
    value = {"b": b"b" * BIG, "ba": bytearray(b"a" * BIG), "mv": memoryview(b"m" * BIG),
             "arrays": [np.ones(BIG // 8), np.zeros(BIG, dtype=np.uint8)]}
    got, _ = roundtrip(value)
    assert got["b"] == value["b"] and got["ba"] == value["ba"]
    assert got["mv"].tobytes() == b"m" * BIG
    assert_same_array(got["arrays"][0], value["arrays"][0])
    assert_same_array(got["arrays"][1], value["arrays"][1])


# -- numpy -------------------------------------------------------------------------------------

DTYPES = ["int8", "uint16", "int32", "int64", "float16", "float32", "float64", "complex128",
          "bool", "datetime64[ns]", "U7", [("x", "<f4"), ("n", "<i2"), ("s", "S3")]]


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d) for d in DTYPES])
def test_numpy_dtypes_out_of_band(dtype: Any) -> None:
    n = BIG // np.dtype(dtype).itemsize + 1
    arr = np.zeros(n, dtype=dtype)
    if arr.dtype.kind in "iufcb":
        arr = (np.arange(n) % 7).astype(dtype)
    got, frames = roundtrip(arr)
    assert_same_array(got, arr)
    assert got.flags.writeable
    if arr.dtype.kind in "iufcb":  # numpy pickles datetime, str, records in band
        assert len(frames) == 2 and len(frames[1]) == arr.nbytes  # the array, out of band


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[::2],
        lambda a: a.T,
        lambda a: a[:, 3],
        lambda a: a[::-1, 1:-1],
        lambda a: np.asfortranarray(a),
        lambda a: np.broadcast_to(a[0], (50, a.shape[1])),
    ],
    ids=["step", "transpose", "column", "reversed", "fortran", "broadcast"],
)
def test_numpy_noncontiguous(make: Any) -> None:
    base = np.arange(400 * 64, dtype=np.float64).reshape(400, 64)
    arr = make(base)
    got, _ = roundtrip(arr)
    assert_same_array(got, arr)
    got[...] = 0  # a copy of its own, writable, not sharing memory with the frames
    assert arr.any()


def test_several_arrays_keep_their_order() -> None:
    arrays = [np.full(BIG // 8, i, dtype=np.int64) for i in range(5)]
    got, frames = roundtrip(arrays)
    assert len(frames) == 6
    for i, a in enumerate(got):
        assert (a == i).all()


def test_numpy_scalar_and_zero_size() -> None:
    got, _ = roundtrip((np.float32(1.5), np.zeros((0, 3)), np.array(7)))
    assert got[0] == np.float32(1.5) and type(got[0]) is np.float32
    assert_same_array(got[1], np.zeros((0, 3)))
    assert_same_array(got[2], np.array(7))


# -- other values ------------------------------------------------------------------------------

def test_containers_and_dataclass() -> None:
    value = ([1, 2], {"k": {3}}, frozenset({4}), Point(1.0, 2.0))
    got, _ = roundtrip(value)
    assert got == value
    assert type(got[3]) is Point


def test_unpicklable_value_names_what_it_was() -> None:
    import threading

    with pytest.raises(rpycsvc.SerializationError, match=r"can't send argument .*lock"):
        dumps([threading.Lock()], "argument")


def test_corrupt_frames_raise_serialization_error() -> None:
    frames = dumps([1, 2, 3])
    with pytest.raises(rpycsvc.SerializationError, match="can't unpickle result"):
        loads((frames[0][:-3],), "result")


def test_missing_out_of_band_frame_is_an_error() -> None:
    frames = dumps(np.zeros(BIG))
    with pytest.raises(rpycsvc.SerializationError):
        loads(frames[:1])


# -- functions ---------------------------------------------------------------------------------

def test_functions_by_value_and_cache() -> None:
    k = 5
    blob = dumps_function(lambda x: x + k)
    cache = FunctionCache(size=2)
    fn = cache.load(blob)
    assert fn(1) == 6
    assert cache.load(blob) is fn  # unpickled once
    cache.load(dumps_function(lambda: 1))
    cache.load(dumps_function(lambda: 2))
    assert cache.load(blob) is not fn  # evicted: the cache is bounded


def test_non_callable_task_is_refused() -> None:
    with pytest.raises(rpycsvc.SerializationError, match="must be callable"):
        dumps_function(42)


# -- exceptions --------------------------------------------------------------------------------

def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_exception_rebuilt_with_traceback_and_address() -> None:
    frames = dump_exception(_raised(KeyError("k")))
    exc = load_exception(frames, "10.0.0.1:18812")
    assert type(exc) is KeyError and exc.args == ("k",)
    assert "KeyError" in exc.remote_traceback  # type: ignore[attr-defined]
    assert exc.address == "10.0.0.1:18812"  # type: ignore[attr-defined]
    assert "10.0.0.1:18812" in str(exc.__cause__)


def test_unrebuildable_exception_is_remote_task_error() -> None:
    exc = load_exception(dump_exception(_raised(TwoArgError("a", "b"))), "h:1")
    assert type(exc) is rpycsvc.RemoteTaskError
    assert exc.remote_type == "tests.support.sample_endpoints.TwoArgError"
    assert "a: b" in str(exc) and "h:1" in str(exc)


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()],
                         ids=["SystemExit", "KeyboardInterrupt", "GeneratorExit"])
def test_base_exceptions_never_reach_the_client_as_themselves(exc: BaseException) -> None:
    got = load_exception(dump_exception(_raised(exc)), "h:1")
    assert type(got) is rpycsvc.RemoteTaskError
    assert type(exc).__name__ in got.remote_type


# -- through a live server ---------------------------------------------------------------------

def test_large_buffers_through_a_live_server(client: rpycsvc.Client) -> None:
    arrays = {str(np.dtype(d)): (np.arange(BIG) % 251).astype(d)
              for d in ("uint8", "int32", "float64", "complex64")}
    value = {"arrays": arrays, "bytes": b"\x01" * BIG, "bytearray": bytearray(b"\x02" * BIG),
             "memoryview": memoryview(np.arange(BIG // 8, dtype=np.int64)),
             "strided": np.arange(BIG, dtype=np.float32)[::3]}
    got = client.compute(lambda v: v, value)
    for name, arr in arrays.items():
        assert_same_array(got["arrays"][name], arr)
    assert got["bytes"] == value["bytes"]
    assert type(got["bytearray"]) is bytearray and got["bytearray"] == value["bytearray"]
    assert type(got["memoryview"]) is memoryview
    np.testing.assert_array_equal(np.asarray(got["memoryview"]), np.arange(BIG // 8))
    assert_same_array(got["strided"], value["strided"])
    # and the task saw real arrays: it can compute with them
    total = client.compute(lambda v: int(v["arrays"]["int32"].sum()), value)
    assert total == int(arrays["int32"].sum())


def test_pickle_protocol_is_5() -> None:
    frames = dumps([1])
    assert frames[0][:2] == b"\x80\x05"
    assert pickle.loads(frames[0]) == [1]
    assert sys.version_info >= (3, 8)
