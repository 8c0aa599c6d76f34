"""rpycsvc: a remote-execution service for Python built on RPyC.

Start servers with ``rpycsvc serve``; connect with :func:`connect` (one server) or
:class:`Cluster` (many); see the README for the whole API.

Every public name is loaded on first use (PEP 562): ``import rpycsvc`` loads nothing but
this file, ``rpycsvc.connect`` loads the client side only, and the server (``rpycsvc.Server``)
or SSH deployment (``rpycsvc.deploy``) is imported only by a program that touches it.
:data:`_LAZY` says which module defines each name.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what static type checkers and IDEs see; at run time __getattr__ loads these
    from rpycsvc._version import __version__
    from rpycsvc.client.aio import AsyncClient, AsyncCluster, AsyncTaskFuture, aconnect
    from rpycsvc.client.cluster import BroadcastResult, Cluster
    from rpycsvc.client.connect import connect
    from rpycsvc.client.connection import Client
    from rpycsvc.client.executor import ClusterExecutor
    from rpycsvc.client.future import TaskFuture
    from rpycsvc.deployment.launcher import deploy
    from rpycsvc.errors import (
        AllServersFailedError,
        AuthenticationError,
        ConfigError,
        ConnectError,
        DeployError,
        EnvironmentMismatchError,
        MessageTooLargeError,
        RemoteTaskError,
        RpycsvcError,
        RpycsvcTimeoutError,
        SerializationError,
        ServerDrainingError,
        ServerLostError,
        TaskCancelledError,
        TaskError,
        TaskTimeoutError,
        VersionMismatchError,
        WorkerCrashedError,
    )
    from rpycsvc.protocol.classic import redirected_stderr, redirected_stdout
    from rpycsvc.server.config import ServerConfig
    from rpycsvc.server.endpoints import endpoint
    from rpycsvc.server.hosted import Queue
    from rpycsvc.server.server import Server

#: public name -> the submodule (of this package) that defines it
_LAZY: dict[str, str] = {
    "__version__": "_version",
    # the client side
    "AsyncClient": "client.aio",
    "AsyncCluster": "client.aio",
    "AsyncTaskFuture": "client.aio",
    "BroadcastResult": "client.cluster",
    "Client": "client.connection",
    "Cluster": "client.cluster",
    "ClusterExecutor": "client.executor",
    "TaskFuture": "client.future",
    "connect": "client.connect",
    "redirected_stderr": "protocol.classic",
    "redirected_stdout": "protocol.classic",
    # the server side
    "Queue": "server.hosted",
    "Server": "server.server",
    "ServerConfig": "server.config",
    "endpoint": "server.endpoints",
    # SSH deployment
    "deploy": "deployment.launcher",
    # errors, under RpycsvcError
    "AllServersFailedError": "errors",
    "AuthenticationError": "errors",
    "ConfigError": "errors",
    "ConnectError": "errors",
    "DeployError": "errors",
    "EnvironmentMismatchError": "errors",
    "MessageTooLargeError": "errors",
    "RemoteTaskError": "errors",
    "RpycsvcError": "errors",
    "RpycsvcTimeoutError": "errors",
    "SerializationError": "errors",
    "ServerDrainingError": "errors",
    "ServerLostError": "errors",
    "TaskCancelledError": "errors",
    "TaskError": "errors",
    "TaskTimeoutError": "errors",
    "VersionMismatchError": "errors",
    "WorkerCrashedError": "errors",
    "aconnect": "client.aio",
}

__all__ = [
    "AllServersFailedError",
    "AsyncClient",
    "AsyncCluster",
    "AsyncTaskFuture",
    "AuthenticationError",
    "BroadcastResult",
    "Client",
    "Cluster",
    "ClusterExecutor",
    "ConfigError",
    "ConnectError",
    "DeployError",
    "EnvironmentMismatchError",
    "MessageTooLargeError",
    "Queue",
    "RemoteTaskError",
    "RpycsvcError",
    "RpycsvcTimeoutError",
    "SerializationError",
    "Server",
    "ServerConfig",
    "ServerDrainingError",
    "ServerLostError",
    "TaskCancelledError",
    "TaskError",
    "TaskFuture",
    "TaskTimeoutError",
    "VersionMismatchError",
    "WorkerCrashedError",
    "__version__",
    "aconnect",
    "connect",
    "deploy",
    "endpoint",
    "redirected_stderr",
    "redirected_stdout",
]


if not TYPE_CHECKING:  # hidden from type checkers, so a misspelt rpycsvc.name stays an error

    def __getattr__(name: str) -> Any:
        """Load a public name from the module :data:`_LAZY` names for it, once (PEP 562)."""
        modname = _LAZY.get(name)
        if modname is None:
            raise AttributeError(f"module 'rpycsvc' has no attribute {name!r}")
        # The import statement's own path (not importlib.import_module), so that
        # ``python -X importtime`` lists the module it loads.
        __import__(f"{__name__}.{modname}")
        value = getattr(sys.modules[f"{__name__}.{modname}"], name)
        globals()[name] = value  # later lookups find it without calling this function
        return value


def __dir__() -> list[str]:
    """The module's own names plus every public name, loaded or not."""
    return sorted(set(globals()) | set(_LAZY))


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext rpycsvc``: register the notebook magics (:mod:`rpycsvc.integrations.ipython`).

    IPython looks this hook up on the package itself; it imports the extension module
    (and IPython's parts it needs) only when the extension is loaded."""
    from rpycsvc.integrations.ipython import load_ipython_extension as load

    load(ipython)
