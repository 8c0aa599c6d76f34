"""The single place that holds rpycsvc's version."""

__version__ = "0.1.0"
