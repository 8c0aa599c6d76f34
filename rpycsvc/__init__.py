"""rpycsvc: a remote-execution service for Python built on RPyC."""

from ._version import __version__

__all__ = ["__version__"]
