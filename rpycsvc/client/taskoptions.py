"""The options a task may carry (``timeout``, ``mode``, ``output``) and their check."""

from __future__ import annotations

from typing import Any

from rpycsvc.errors import ConfigError
from rpycsvc.protocol.checks import check_timeout

#: Options a task may carry (see :meth:`Client.options`).
TASK_OPTIONS = ("timeout", "mode", "output")


def check_options(opts: dict[str, Any]) -> dict[str, Any]:
    for name, value in opts.items():
        if name not in TASK_OPTIONS:
            raise ConfigError(f"unknown task option {name!r}; known: {', '.join(TASK_OPTIONS)}")
        if name == "timeout":
            check_timeout(value)
        if name == "mode" and value not in ("process", "thread"):
            raise ConfigError(f"mode must be 'process' or 'thread'; got {value!r}")
        if name == "output" and value not in ("stream", "capture", "discard"):
            raise ConfigError(f"output must be 'stream', 'capture' or 'discard'; got {value!r}")
    return opts
