"""Checks of values that both sides of the wire make: a task's timeout, a loopback host.

Neutral ground: the client checks a task's options before sending it and the server checks
them again on arrival, and the registry and the server's settings both ask whether a host is
loopback. Keeping these here lets the client side (``client``, ``cluster``) import them
without loading the server's settings module (:mod:`rpycsvc.server.config`), which re-exports them
for the server side. This module imports nothing from rpycsvc but :mod:`rpycsvc.errors`.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any

from rpycsvc.errors import ConfigError


def check_timeout(value: Any) -> float | None:
    """A task's ``timeout``: None, or a finite number of seconds above 0 (else ConfigError).

    Checked by the client, and again by the server on arrival (task messages and
    ``conn.root.compute`` alike): a ``nan`` deadline would sort before every other and
    silence all timeouts."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds; got {value!r}")
    return float(value)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
