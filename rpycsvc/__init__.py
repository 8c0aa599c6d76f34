"""rpycsvc: a remote-execution service for Python built on RPyC.

Start servers with ``rpycsvc serve``; connect with :func:`connect` (one server) or
:class:`Cluster` (many); see the README for the whole API.
"""

from ._version import __version__
from .classic import redirected_stderr, redirected_stdout
from .client import Client, TaskFuture, connect
from .cluster import BroadcastResult, Cluster, ClusterExecutor
from .config import ServerConfig
from .deployment import deploy
from .endpoints import endpoint
from .errors import (
    AllServersFailedError,
    AuthenticationError,
    ConfigError,
    ConnectError,
    DeployError,
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
from .hosted import Queue
from .server import Server

__all__ = [
    "AllServersFailedError",
    "AuthenticationError",
    "BroadcastResult",
    "Client",
    "Cluster",
    "ClusterExecutor",
    "ConfigError",
    "ConnectError",
    "DeployError",
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
    "connect",
    "deploy",
    "endpoint",
    "redirected_stderr",
    "redirected_stdout",
]
