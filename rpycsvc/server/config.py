"""Typed server settings: defaults in one place, filled from the command line and from
``RPYCSVC_*`` environment variables (the command line wins)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from typing import Any

from rpycsvc.errors import ConfigError

# check_timeout and is_loopback live in the neutral _checks (the client needs them without
# the server's settings); they stay importable from here for the server side.
from rpycsvc.protocol.checks import check_timeout, is_loopback

__all__ = ["DEFAULT_INBOUND_BUDGET", "DEFAULT_MAX_MESSAGE", "DEFAULT_PORT", "MODES",
           "ServerConfig", "check_timeout", "is_loopback", "parse_size"]

DEFAULT_PORT = 18812
#: Default largest message a server accepts from an authenticated peer and sends as a reply:
#: a 1 GiB payload plus its framing fits, and the server's peak for one such message (the
#: frame, plus the copies RPyC's decoding makes) stays a few GiB.
DEFAULT_MAX_MESSAGE = 2 << 30
#: Default budget of inbound bytes being received at once: two messages of the largest size.
DEFAULT_INBOUND_BUDGET = 4 << 30
#: What an RPyC frame header can announce: no message limit can be above it.
_WIRE_MAX = 0xFFFFFFFF
MODES = ("threaded", "forking", "oneshot", "stdio")


@dataclass
class ServerConfig:
    """Everything ``rpycsvc serve`` can be told. Field names match the long CLI options."""

    host: str = ""  # "": loopback, 127.0.0.1 (::1 with ipv6), as rpyc_classic does
    port: int = DEFAULT_PORT
    mode: str = "threaded"
    ipv6: bool = False
    workers: int = 0  # 0: one per core
    threads: int = 256  # thread-mode tasks running at once; 0 disables thread mode
    endpoints: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)  # module:Class[=name], hosted objects
    service_scope: str = "server"
    classic: bool = True
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_cafile: str | None = None
    authkey: str | None = None
    insecure: bool = False
    register: bool = False
    registry_type: str = "TCP"  # a TCP registry on 127.0.0.1 unless told otherwise
    registry_host: str | None = None
    registry_port: int = 18811
    logfile: str | None = None
    quiet: bool = False
    verbose: bool = False
    grace: float = 10.0
    handshake_timeout: float = 5.0
    max_pending: int = 64  # connections still in their handshake
    memory_limit: int = 0  # bytes per worker process; 0: no limit
    keepalive: float = 0.0  # stdio mode: exit after this long without a word from the client
    # Stop (as on SIGTERM) when stdin reaches its end: a server started with a pipe as stdin
    # ends with the process holding the pipe's other end (Cluster.local's client).
    exit_on_stdin_eof: bool = False
    metrics_port: int | None = None
    lanes: bool = True  # deprecated and ignored (one task path now); False is logged
    # Largest message (RPyC frame) accepted from an authenticated peer, and largest reply
    # sent: a task whose arguments or result are over it fails alone (MessageTooLargeError).
    max_message_size: int = DEFAULT_MAX_MESSAGE
    # Bytes of inbound messages being received at once, all connections together: past it
    # the server stops reading from authenticated peers and refuses unauthenticated ones.
    inbound_budget: int = DEFAULT_INBOUND_BUDGET
    # Seconds a peer may send nothing in the middle of a message that holds a part of the
    # inbound budget before it is dropped (its part freed); see transport.SMALL_MESSAGE.
    stall_timeout: float = 30.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """Defaults, then ``RPYCSVC_<FIELD>`` variables, then ``overrides`` (non-None only)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"RPYCSVC_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, str(f.type), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def __post_init__(self) -> None:
        if not self.host:
            self.host = "::1" if self.ipv6 else "127.0.0.1"

    @property
    def effective_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def uses_ssl(self) -> bool:
        return bool(self.ssl_keyfile or self.ssl_certfile)

    def validate(self) -> None:
        """Refuse unsafe or impossible settings with a message that says the fix."""
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535 (0 picks a free port); got {self.port!r}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 1 (or 0 for one per core), and so must "
                              f"RPYCSVC_WORKERS; got {self.workers}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0; got {self.threads}")
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise ConfigError("--ssl-keyfile and --ssl-certfile must be given together")
        if self.ssl_cafile and not self.uses_ssl:
            raise ConfigError("--ssl-cafile needs --ssl-keyfile and --ssl-certfile too")
        if self.ipv6 and _is_ipv4(self.host):
            raise ConfigError(
                f"--ipv6 binds an IPv6 address, but --host {self.host!r} is IPv4: leave --host "
                "out to bind ::1, or give an IPv6 address (e.g. ::1, or :: for every interface)")
        for name in ("ssl_keyfile", "ssl_certfile", "ssl_cafile"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"--{name.replace('_', '-')}: no such file {path!r}")
        if self.mode != "stdio" and not is_loopback(self.host) and not (
            self.uses_ssl or self.authkey or self.insecure
        ):
            raise ConfigError(
                f"refusing to listen on non-loopback address {self.host!r} without protection: "
                "anyone who can reach the port could run code as this user. Give "
                "--ssl-keyfile/--ssl-certfile (TLS), --authkey (or RPYCSVC_AUTHKEY), or "
                "--insecure if the network is trusted."
            )
        self.registry_type = str(self.registry_type).upper()
        if self.registry_type not in ("UDP", "TCP"):
            raise ConfigError(f"--registry-type must be UDP or TCP; got {self.registry_type!r}")
        if not 0 < self.max_message_size <= _WIRE_MAX:
            raise ConfigError(
                f"--max-message-size must be above 0 and at most {_WIRE_MAX} bytes (what an "
                f"RPyC frame header can say, just under 4G); got {self.max_message_size}")
        if self.inbound_budget < self.max_message_size:
            raise ConfigError(
                f"--inbound-budget ({self.inbound_budget} bytes) must be at least "
                f"--max-message-size ({self.max_message_size} bytes), or a message of the "
                "largest size could never be received")
        if self.handshake_timeout <= 0:
            raise ConfigError(f"--handshake-timeout must be > 0 seconds; got "
                              f"{self.handshake_timeout!r}")
        if not self.stall_timeout > 0:
            raise ConfigError(f"--stall-timeout must be > 0 seconds; got "
                              f"{self.stall_timeout!r}")
        if self.max_pending < 1:
            raise ConfigError(f"--max-pending must be >= 1; got {self.max_pending!r}")
        if self.authkey is not None and len(self.authkey) < 8:
            raise ConfigError("--authkey must be at least 8 characters long")

    def check_serves_something(self) -> None:
        """Refuse a service-only server that offers nothing (``rpycsvc serve`` calls this).

        With ``--no-classic`` a server runs no code from clients: without endpoints or
        hosted objects, every task would be refused. (The Python API allows such a server:
        its refusals are what tests of service-only mode look at.)"""
        if not self.classic and not self.endpoints and not self.services:
            raise ConfigError(
                "service-only mode (--no-classic, RPYCSVC_CLASSIC=false) with nothing to "
                "serve: it runs no code from clients, so it needs endpoints or hosted "
                "objects. Add --endpoints MODULE (RPYCSVC_ENDPOINTS) and/or --service "
                "MODULE:CLASS (RPYCSVC_SERVICES), or drop --no-classic for classic access.")


def _is_ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


def parse_size(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1.5k"`` or plain bytes → bytes; ``ValueError`` if not a size."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


#: Fields whose environment variable is parsed like the command-line option, not by type.
_PARSERS = {"memory_limit": parse_size, "max_message_size": parse_size,
            "inbound_budget": parse_size}


def _parse(name: str, typ: str, raw: str) -> Any:
    var = f"RPYCSVC_{name.upper()}"
    try:
        if name in _PARSERS:
            return _PARSERS[name](raw)
        if typ.startswith("bool"):
            low = raw.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return low in ("1", "true", "yes", "on")
        if typ.startswith("int"):
            return int(raw)
        if typ.startswith("float"):
            return float(raw)
        if typ.startswith("list"):
            return [x.strip() for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"environment variable {var}={raw!r} is not a valid {typ}") from None
    return raw
