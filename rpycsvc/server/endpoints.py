"""Named compute endpoints: functions a server offers by name (``@rpycsvc.endpoint``).

``rpycsvc serve --endpoints mymodule`` imports ``mymodule`` in every worker and registers
the functions marked with :func:`endpoint`; clients then call them by name, which works
from plain RPyC clients and in service-only mode, where no code travels from clients.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar, overload

from rpycsvc.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__rpycsvc_endpoint__"


@overload
def endpoint(fn: F, *, name: str | None = None) -> F: ...
@overload
def endpoint(fn: None = None, *, name: str | None = None) -> Callable[[F], F]: ...


def endpoint(fn: Any = None, *, name: str | None = None) -> Any:
    """Mark ``fn`` as a compute endpoint, callable by ``name`` (default: its ``__name__``).

    Use as ``@endpoint`` or ``@endpoint(name="resize")``. The function is unchanged.
    """

    def mark(f: F) -> F:
        if not callable(f):
            raise ConfigError(f"@endpoint needs a function, got {f!r}")
        setattr(f, _MARK, name or f.__name__)
        return f

    return mark(fn) if fn is not None else mark


def load_endpoints(modules: list[str]) -> dict[str, Callable[..., Any]]:
    """Import each module and collect its marked functions, by endpoint name.

    Raises :class:`ConfigError` naming the module when it can't be imported, has no
    endpoints, or two endpoints share a name.
    """
    table: dict[str, Callable[..., Any]] = {}
    for modname in modules:
        try:
            mod = importlib.import_module(modname)
        except Exception as exc:
            raise ConfigError(
                f"--endpoints: can't import module {modname!r}: {type(exc).__name__}: {exc}. "
                "Is it on the server's PYTHONPATH?"
            ) from exc
        found = 0
        for value in vars(mod).values():
            ep_name = getattr(value, _MARK, None)
            if not isinstance(ep_name, str) or not callable(value):
                continue
            if ep_name in table and table[ep_name] is not value:
                raise ConfigError(f"--endpoints: two endpoints are named {ep_name!r}")
            table[ep_name] = value
            found += 1
        if not found:
            raise ConfigError(
                f"--endpoints: module {modname!r} has no function marked @rpycsvc.endpoint"
            )
    return table


def resolve_path(path: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (or ``"module:Class.method"``) and return it."""
    modname, sep, attr = path.partition(":")
    if not sep or not modname or not attr:
        raise ConfigError(
            f"task {path!r} is neither a registered endpoint nor an import path; "
            "write import paths as 'package.module:function'"
        )
    try:
        obj: Any = importlib.import_module(modname)
    except Exception as exc:
        raise ConfigError(
            f"task {path!r}: can't import module {modname!r} on the server: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"task {path!r}: module {modname!r} has no {attr!r}") from None
    if not callable(obj):
        raise ConfigError(f"task {path!r} names {type(obj).__name__} object, not a function")
    return obj
