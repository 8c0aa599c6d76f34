"""The public surface: a sorted ``__all__`` of names that exist, and one exception tree
rooted at RpycsvcError exactly as the errors module's docstring draws it."""

from __future__ import annotations

import concurrent.futures
import inspect
import re
from pathlib import Path

import pytest

import rpycsvc
from rpycsvc import errors


def test_all_is_sorted_and_unique() -> None:
    assert rpycsvc.__all__ == sorted(rpycsvc.__all__)
    assert len(set(rpycsvc.__all__)) == len(rpycsvc.__all__)


@pytest.mark.parametrize("name", rpycsvc.__all__)
def test_every_public_name_exists_and_is_documented(name: str) -> None:
    obj = getattr(rpycsvc, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert inspect.getdoc(obj), f"rpycsvc.{name} has no docstring"


def test_public_exceptions_are_exported() -> None:
    defined = {n for n, obj in vars(errors).items()
               if inspect.isclass(obj) and issubclass(obj, errors.RpycsvcError)}
    assert defined <= set(rpycsvc.__all__), defined - set(rpycsvc.__all__)


def _drawn_tree() -> dict[str, str]:
    """``{class: parent}`` as drawn in the docstring of rpycsvc.errors."""
    doc = errors.__doc__ or ""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        m = re.search(r"\b([A-Z]\w*Error)\b", line)
        if not m or not (line.strip().startswith(("├", "└", "│")) or
                         line.strip() == m.group(1)):
            continue
        col = m.start(1)
        while stack and stack[-1][0] >= col:
            stack.pop()
        if stack:
            parents[m.group(1)] = stack[-1][1]
        stack.append((col, m.group(1)))
    return parents


def test_exception_tree_matches_its_drawing() -> None:
    drawn = _drawn_tree()
    assert drawn, "errors.__doc__ should draw the exception tree"
    exported = {n for n in rpycsvc.__all__
                if inspect.isclass(getattr(rpycsvc, n))
                and issubclass(getattr(rpycsvc, n), BaseException)}
    assert exported - {"RpycsvcError"} == set(drawn), "drawing and exports differ"
    for name, parent in drawn.items():
        cls, parent_cls = getattr(rpycsvc, name), getattr(rpycsvc, parent)
        assert parent_cls in cls.__bases__, f"{name} should derive from {parent}"


@pytest.mark.parametrize("name", [n for n in rpycsvc.__all__ if n.endswith("Error")])
def test_every_error_is_an_rpycsvc_error(name: str) -> None:
    assert issubclass(getattr(rpycsvc, name), rpycsvc.RpycsvcError)


def test_builtin_bases_for_catching_without_rpycsvc() -> None:
    assert issubclass(rpycsvc.TaskTimeoutError, TimeoutError)
    assert issubclass(rpycsvc.TaskTimeoutError, rpycsvc.TaskError)
    assert issubclass(rpycsvc.RpycsvcTimeoutError, TimeoutError)
    assert issubclass(rpycsvc.ConfigError, ValueError)
    assert issubclass(rpycsvc.ConnectError, ConnectionError)
    for sub in (rpycsvc.AuthenticationError, rpycsvc.VersionMismatchError,
                rpycsvc.ServerLostError):
        assert issubclass(sub, rpycsvc.ConnectError)
    for sub in (rpycsvc.RemoteTaskError, rpycsvc.WorkerCrashedError,
                rpycsvc.TaskCancelledError):
        assert issubclass(sub, rpycsvc.TaskError)


def test_errors_carry_where_they_happened() -> None:
    err = rpycsvc.RemoteTaskError("boom", remote_type="mod.E", remote_traceback="tb text",
                                  address="h:1")
    assert (err.address, err.remote_type, err.remote_traceback) == ("h:1", "mod.E", "tb text")
    assert "mod.E: boom on h:1" in str(err) and "tb text" in str(err)
    assert rpycsvc.VersionMismatchError("x", address="h:2").address == "h:2"
    assert rpycsvc.WorkerCrashedError("x", address="h:3").address == "h:3"
    failed = rpycsvc.AllServersFailedError("none left", {"a:1": "down", "b:2": OSError("x")})
    assert "a:1: down" in str(failed) and "b:2" in str(failed)


def test_futures_are_concurrent_futures() -> None:
    assert issubclass(rpycsvc.TaskFuture, concurrent.futures.Future)


def test_version_and_typed_marker() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", rpycsvc.__version__)
    assert (Path(rpycsvc.__file__).parent / "py.typed").is_file()


def test_connect_and_endpoint_signatures() -> None:
    params = inspect.signature(rpycsvc.connect).parameters
    assert "timeout" in params and params["timeout"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(rpycsvc.Client.submit).parameters  # (task, /, *args, **kwargs)

    def f() -> None:
        """An endpoint."""

    assert rpycsvc.endpoint(name="x")(f) is f  # marks, never wraps
