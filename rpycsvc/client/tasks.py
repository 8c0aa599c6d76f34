"""Celery-style task objects: ``@cluster.task`` makes a function submittable.

``add.delay(5, 7)`` returns a :class:`~rpycsvc.client.future.TaskFuture` (with ``.id``) at once;
``add.apply_async((5, 7), timeout=10)`` does the same with options; ``add(5, 7)`` still
calls the function locally, as with Celery.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Callable, Protocol

from rpycsvc.client.future import TaskFuture


class _Calls(Protocol):
    """``cluster.options(...)``: ``submit`` and ``map`` with the task's options."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> TaskFuture: ...

    def map(self, fn: Any, *iterables: Any, **kw: Any) -> Iterator[Any]: ...


class _Cluster(Protocol):
    """What a task needs of its :class:`~rpycsvc.Cluster`: its ``options``."""

    def options(self, **opts: Any) -> _Calls: ...


class RemoteTask:
    """A function bound to a cluster, with task options (``timeout``, ``mode``, ``retries``).

    The task option ``timeout`` is how long each run may take on its server; it is never a
    deadline for waiting (``future.result(timeout)`` and ``map(..., timeout=T)`` are)."""

    def __init__(self, cluster: _Cluster, fn: Callable[..., Any], **options: Any) -> None:
        self.cluster = cluster
        self.fn = fn
        self.options = options
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run locally, unchanged."""
        return self.fn(*args, **kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run remotely with the task's options; returns a future at once."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                    **options: Any) -> TaskFuture:
        """Run remotely; ``options`` (``timeout``, ``mode``, ``retries``) override the task's."""
        return self.cluster.options(**{**self.options, **options}).submit(
            self.fn, *args, **(kwargs or {}))

    def map(self, iterable: Any, **kw: Any) -> Any:
        """``cluster.map`` of this task over ``iterable``: each item runs with the task's
        options (its ``timeout`` limits each item's run); ``timeout=T`` given here is the
        deadline for the whole iteration, as in ``Executor.map``."""
        return self.cluster.options(**self.options).map(self.fn, iterable, **kw)

    def __repr__(self) -> str:
        return f"<RemoteTask {getattr(self.fn, '__qualname__', self.fn)!r}>"
