"""ServerConfig: defaults in one place, RPYCSVC_* environment variables and command-line
options mapped onto the same fields, the command line winning; refusals that name the fix."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

import rpycsvc
from rpycsvc.cli import main as cli
from rpycsvc.server.config import ServerConfig, is_loopback
from tests.support.servers import ServerProcess


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli.add_serve_arguments(parser)
    return parser


def config_for(argv: list[str]) -> ServerConfig:
    return cli.config_from_args(serve_parser().parse_args(argv))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RPYCSVC_* variable from the outside leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("RPYCSVC_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    cfg = ServerConfig()
    assert (cfg.host, cfg.port, cfg.mode, cfg.classic) == ("127.0.0.1", 18812, "threaded", True)
    assert cfg.effective_workers >= 1
    assert ServerConfig.from_env({}) == cfg
    assert config_for([]) == cfg


# -- environment -------------------------------------------------------------------------------

ENV_CASES: list[tuple[str, str, Any]] = [
    ("host", "localhost", "localhost"),
    ("port", "2345", 2345),
    ("mode", "forking", "forking"),
    ("ipv6", "yes", True),
    ("workers", "3", 3),
    ("threads", "0", 0),
    ("endpoints", "a.b, c.d", ["a.b", "c.d"]),
    ("classic", "0", False),
    ("authkey", "a-long-secret", "a-long-secret"),
    ("insecure", "true", True),
    ("register", "on", True),
    ("registry_type", "udp", "UDP"),
    ("registry_host", "127.0.0.9", "127.0.0.9"),
    ("registry_port", "18899", 18899),
    ("logfile", "/tmp/x.log", "/tmp/x.log"),
    ("quiet", "1", True),
    ("verbose", "false", False),
    ("grace", "2.5", 2.5),
    ("handshake_timeout", "0.5", 0.5),
    ("max_pending", "7", 7),
    ("memory_limit", "1048576", 1 << 20),
]


@pytest.mark.parametrize(("field", "raw", "value"), ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_env_var_sets_field(field: str, raw: str, value: Any) -> None:
    cfg = ServerConfig.from_env({f"RPYCSVC_{field.upper()}": raw})
    assert getattr(cfg, field) == value


def test_every_field_has_an_env_var(tmp_path: Path) -> None:
    """Each field of ServerConfig reads RPYCSVC_<FIELD>; none is left out."""
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here")
    samples = {"str": "localhost", "int": "5", "float": "1.5", "bool": "1", "list": "m"}
    special = {"mode": "oneshot", "authkey": "long-enough", "registry_type": "UDP",
               "ssl_keyfile": str(cert), "ssl_certfile": str(cert), "ssl_cafile": str(cert),
               "service_scope": "connection", "services": "m:C"}
    env = {}
    for f in dataclasses.fields(ServerConfig):
        kind = str(f.type).split("[")[0].split(" ")[0]
        sample = samples[kind]
        if kind == "bool":  # the opposite of the default, so that a change shows
            sample = "0" if getattr(ServerConfig(), f.name) else "1"
        env[f"RPYCSVC_{f.name.upper()}"] = special.get(f.name, sample)
    cfg = ServerConfig.from_env(env)
    default = ServerConfig()
    unchanged = [f.name for f in dataclasses.fields(ServerConfig)
                 if getattr(cfg, f.name) == getattr(default, f.name)]
    assert unchanged == [], f"not settable from the environment: {unchanged}"


def test_empty_env_var_means_default() -> None:
    assert ServerConfig.from_env({"RPYCSVC_PORT": "", "RPYCSVC_HOST": ""}) == ServerConfig()


@pytest.mark.parametrize(
    ("var", "raw"),
    [("RPYCSVC_PORT", "http"), ("RPYCSVC_WORKERS", "2.5"), ("RPYCSVC_CLASSIC", "maybe"),
     ("RPYCSVC_GRACE", "soon")],
)
def test_bad_env_value_names_the_variable(var: str, raw: str) -> None:
    with pytest.raises(rpycsvc.ConfigError) as info:
        ServerConfig.from_env({var: raw})
    assert var in str(info.value) and repr(raw) in str(info.value)


def test_env_memory_limit_accepts_the_cli_syntax() -> None:
    assert ServerConfig.from_env({"RPYCSVC_MEMORY_LIMIT": "2G"}).memory_limit == 2 << 30
    assert config_for(["--memory-limit", "512M"]).memory_limit == 512 << 20
    with pytest.raises(rpycsvc.ConfigError, match="RPYCSVC_MEMORY_LIMIT"):
        ServerConfig.from_env({"RPYCSVC_MEMORY_LIMIT": "lots"})


def test_env_registry_type_is_checked() -> None:
    assert ServerConfig.from_env({"RPYCSVC_REGISTRY_TYPE": "tcp"}).registry_type == "TCP"
    with pytest.raises(rpycsvc.ConfigError, match="registry"):
        ServerConfig.from_env({"RPYCSVC_REGISTRY_TYPE": "carrier-pigeon"})


# -- command line over environment ---------------------------------------------------------------

def test_cli_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPYCSVC_WORKERS", "1")
    monkeypatch.setenv("RPYCSVC_PORT", "2000")
    monkeypatch.setenv("RPYCSVC_ENDPOINTS", "from.env")
    monkeypatch.setenv("RPYCSVC_GRACE", "3")
    monkeypatch.setenv("RPYCSVC_CLASSIC", "1")
    cfg = config_for(["--workers", "4", "--endpoints", "from.cli", "--no-classic"])
    assert cfg.workers == 4  # the command line wins...
    assert cfg.endpoints == ["from.cli"]
    assert cfg.classic is False
    assert cfg.port == 2000  # ...and the environment fills in what it doesn't say
    assert cfg.grace == 3.0


def test_every_serve_option_reaches_the_config(tmp_path: Path) -> None:
    """Each option of ``rpycsvc serve`` lands on the ServerConfig field of the same name."""
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    argv = ["--host", "localhost", "--port", "0", "--ipv6", "-m", "forking", "--workers", "3",
            "--threads", "4", "--endpoints", "e1", "--endpoints", "e2", "--memory-limit", "1M",
            "--grace", "1.5", "--no-classic", "--authkey", "12345678", "--ssl-keyfile",
            str(cert), "--ssl-certfile", str(cert), "--ssl-cafile", str(cert), "--insecure",
            "--handshake-timeout", "2", "--register", "--registry-type", "TCP",
            "--registry-port", "1", "--registry-host", "h", "--logfile", "l", "-q", "-v"]
    cfg = config_for(argv)
    assert (cfg.host, cfg.port, cfg.ipv6, cfg.mode) == ("localhost", 0, True, "forking")
    assert (cfg.workers, cfg.threads, cfg.endpoints) == (3, 4, ["e1", "e2"])
    assert (cfg.memory_limit, cfg.grace, cfg.classic) == (1 << 20, 1.5, False)
    assert (cfg.authkey, cfg.ssl_keyfile, cfg.ssl_cafile) == ("12345678", str(cert), str(cert))
    assert (cfg.insecure, cfg.handshake_timeout) == (True, 2.0)
    assert (cfg.register, cfg.registry_type, cfg.registry_port, cfg.registry_host) == (
        True, "TCP", 1, "h")
    assert (cfg.logfile, cfg.quiet, cfg.verbose) == ("l", True, True)
    field_names = {f.name for f in dataclasses.fields(ServerConfig)}
    dests = {a.dest for a in serve_parser()._actions if a.dest != "help"}
    assert dests <= field_names, f"options without a config field: {dests - field_names}"


def test_env_and_cli_in_a_real_server(server_process: type[ServerProcess]) -> None:
    proc = server_process("--workers", "2",
                          env={"RPYCSVC_WORKERS": "1",
                               "RPYCSVC_ENDPOINTS": "tests.support.sample_endpoints"})
    with rpycsvc.connect(proc.address) as c:
        assert c.stats()["workers"] == 2  # the command line won
        assert c.compute("add", 1, 2) == 3  # the environment still registered the endpoints


# -- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)
    ServerConfig(host=host).validate()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::", "example.com"])
def test_non_loopback_needs_protection(host: str, tmp_path: Path) -> None:
    assert not is_loopback(host)
    with pytest.raises(rpycsvc.ConfigError) as info:
        ServerConfig(host=host).validate()
    message = str(info.value)
    assert repr(host) in message
    assert "--authkey" in message and "--insecure" in message and "--ssl-keyfile" in message
    ServerConfig(host=host, authkey="long-enough").validate()
    ServerConfig(host=host, insecure=True).validate()
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    ServerConfig(host=host, ssl_keyfile=str(cert), ssl_certfile=str(cert)).validate()


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"mode": "spawn"}, "--mode must be one of"),
        ({"port": -1}, "--port must be 0..65535"),
        ({"workers": -1}, "--workers"),
        ({"threads": -5}, "--threads"),
        ({"authkey": "short"}, "at least 8"),
        ({"ssl_cafile": "/nonexistent"}, "--ssl-cafile needs"),
    ],
)
def test_invalid_values_are_refused(kwargs: dict[str, Any], expect: str) -> None:
    with pytest.raises(rpycsvc.ConfigError, match=expect):
        ServerConfig(**kwargs).validate()


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        ServerConfig(port=70000).validate()
