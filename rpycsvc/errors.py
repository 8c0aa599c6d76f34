"""The one exception tree of rpycsvc.

Low-level failures (socket errors, RPyC's bare ``EOFError``, pickling errors) are translated
into these types in one place each, with ``raise ... from exc``, so callers can catch
``RpycsvcError`` (or a builtin such as ``TimeoutError``) and never an RPyC internal::

    RpycsvcError
    ├── ConfigError                 (an invalid option or argument; also a ValueError)
    ├── SerializationError          (a task, argument or result can't travel by value)
    │   └── EnvironmentMismatchError (code sent by value, server of another Python/cloudpickle)
    ├── ConnectError                (no connection could be made, or it was lost)
    │   ├── AuthenticationError     (credentials missing or wrong)
    │   ├── VersionMismatchError    (client and server run different rpyc/rpycsvc)
    │   └── ServerLostError         (an established connection died mid-task)
    ├── TaskError                   (something went wrong running one task)
    │   ├── RemoteTaskError         (the task raised; keeps remote type, traceback, server)
    │   ├── TaskTimeoutError        (the task ran past its timeout; also a TimeoutError)
    │   ├── WorkerCrashedError      (the task killed its worker process: os._exit, segfault, OOM)
    │   ├── TaskCancelledError      (cancelled on request)
    │   │   └── ServerDrainingError (refused or never started: the server is shutting down)
    │   └── MessageTooLargeError    (an argument or result over a size limit; a SerializationError)
    ├── AllServersFailedError       (no server is left to run a task; names every server)
    ├── DeployError                 (pushing or starting a server over SSH failed)
    └── RpycsvcTimeoutError         (a blocking call ran out of time; also a TimeoutError)

Every timeout rpycsvc raises (``RpycsvcTimeoutError``, ``TaskTimeoutError``) is caught by both
``except TimeoutError`` and ``except concurrent.futures.TimeoutError`` on every supported
Python: before 3.11 those are two different classes, so both are bases here.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping

# Before Python 3.11, concurrent.futures.TimeoutError is not the builtin TimeoutError.
_TIMEOUT_BASES: tuple[type[Exception], ...] = (
    (TimeoutError,)
    if concurrent.futures.TimeoutError is TimeoutError
    else (TimeoutError, concurrent.futures.TimeoutError)
)


class RpycsvcError(Exception):
    """Base class of every error rpycsvc raises on purpose."""


class ConfigError(RpycsvcError, ValueError):
    """An option, argument or environment variable has an invalid value."""


class SerializationError(RpycsvcError):
    """A task function, an argument or a result could not be sent by value."""


class EnvironmentMismatchError(SerializationError):
    """A task holds code pickled by value (a function or class from ``__main__``, a lambda)
    and its server runs another Python minor version or cloudpickle major version, which
    can't rebuild it. Raised on the client before the task is sent; nothing ran.

    The task's code, not the server's health, is the problem, so a ``Cluster`` never re-runs
    it elsewhere; a ``Cluster`` with servers of both kinds gives such tasks only to servers
    that can rebuild them, so it raises this only when none can (or for ``broadcast``).
    ``client`` and ``server`` hold both sides' ``python`` and ``cloudpickle`` versions;
    ``address`` names the server.
    """

    def __init__(self, message: str, *, address: str | None = None,
                 client: dict[str, str] | None = None,
                 server: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.address = address
        self.client = dict(client or {})
        self.server = dict(server or {})


class ConnectError(RpycsvcError, ConnectionError):
    """A connection to a server could not be made, or was lost."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


class AuthenticationError(ConnectError):
    """The server refused our credentials, or we refused the server's."""


class VersionMismatchError(ConnectError):
    """Client and server run different rpyc or rpycsvc versions and cannot talk."""


class ServerLostError(ConnectError):
    """An established connection died while tasks were in flight on it."""


class RpycsvcTimeoutError(RpycsvcError, *_TIMEOUT_BASES):  # type: ignore[misc]
    """A blocking call (connect, result, map) ran out of time."""


class TaskError(RpycsvcError):
    """A single task failed. ``address`` names the server it ran on."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


class RemoteTaskError(TaskError):
    """The task raised an exception that can't be rebuilt as its own type here.

    ``remote_type`` is the qualified name of the remote exception type and
    ``remote_traceback`` the formatted remote traceback.
    """

    def __init__(
        self,
        message: str,
        *,
        remote_type: str = "",
        remote_traceback: str = "",
        address: str | None = None,
    ) -> None:
        super().__init__(message, address=address)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        base = super().__str__()
        where = f" on {self.address}" if self.address else ""
        head = f"{self.remote_type}: {base}" if self.remote_type else base
        if self.remote_traceback:
            return f"{head}{where}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return f"{head}{where}"


class TaskTimeoutError(TaskError, *_TIMEOUT_BASES):  # type: ignore[misc]
    """The task ran longer than its ``timeout`` and was stopped on the server."""


class WorkerCrashedError(TaskError):
    """The task's worker process died (``os._exit``, a signal, out of memory)."""


class TaskCancelledError(TaskError):
    """The task was cancelled before it finished."""


class ServerDrainingError(TaskCancelledError):
    """The server is shutting down and refused the task, or dropped it before it started.

    The task never ran, so a ``Cluster`` sends it to another server whatever ``retries`` says.
    """


class MessageTooLargeError(TaskError, SerializationError):
    """An argument or a result is over a size limit; the error names the limit and its setting.

    Only this task fails: the connection stays up and a ``Cluster`` does not retry it.
    """


class AllServersFailedError(RpycsvcError):
    """No server is left to run a task. ``causes`` maps each server to why it failed."""

    def __init__(self, message: str, causes: Mapping[str, BaseException | str] | None = None):
        self.causes = dict(causes or {})
        detail = "; ".join(f"{addr}: {cause}" for addr, cause in self.causes.items())
        super().__init__(f"{message} ({detail})" if detail else message)


class DeployError(RpycsvcError):
    """Pushing or starting a server on a host over SSH failed."""

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of a rebuilt remote exception: shows the remote traceback."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text
