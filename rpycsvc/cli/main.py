"""The ``rpycsvc`` command: ``serve`` and the other subcommands.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args)``;
:data:`COMMANDS` maps names to modules and one-line helps. :func:`main` imports only the
module of the subcommand it runs (``rpycsvc --help`` imports none), so every command starts
without loading the others (``bench``, ``deploy``'s SSH bootstrap, the REPL...).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Collection, Sequence
from typing import Any

from rpycsvc.errors import ConfigError, RpycsvcError
from rpycsvc.server.config import DEFAULT_PORT, MODES, ServerConfig, parse_size

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("rpycsvc.cli.main", "run a server (compute endpoints + classic access)"),
    "demo": ("rpycsvc.cli.demo", "start local servers and run a fan-out on them"),
    "bench": ("rpycsvc.cli.bench", "measure latency, throughput and transfer rates"),
    "status": ("rpycsvc.cli.status", "show a table of servers' state"),
    "top": ("rpycsvc.cli.top", "live view of servers: throughput, running tasks, failures"),
    "repl": ("rpycsvc.cli.repl", "interactive Python REPL running on a server"),
    "registry": ("rpycsvc.server.registry", "run an RPyC registry for discovery"),
    "deploy": ("rpycsvc.deployment.command",
               "push servers to hosts over SSH and serve or run a script"),
}

SERVE_DESCRIPTION = """\
Run an rpycsvc server: compute endpoints (conn.root.compute) on a pool of worker
processes, plus RPyC classic access (conn.modules, conn.execute, conn.eval).

The first line printed on stdout is the address it listens on (host:port), so scripts
can start it with --port 0 and read the port (rpycsvc_classic -m oneshot prints what
rpyc_classic prints instead: "rpyc-oneshot", then HOST<tab>PORT). SIGTERM or Ctrl-C stops
accepting, lets running tasks finish within --grace seconds, and exits 0 (a shutdown
that still hangs 30 s after that exits 1, with every thread's stack on stderr).

SECURITY: classic mode is remote code execution by design: anyone who can connect can
run any code as this user. It binds 127.0.0.1 by default; binding another address needs
TLS (--ssl-*), an --authkey, or an explicit --insecure. --no-classic offers only the
endpoints registered with --endpoints and the objects hosted with --service (it needs
one of them) and accepts no code from clients. A plain RPyC client can't present an
authkey: on a server with one, it gets a PermissionError saying to use rpycsvc.connect.

Every option can also be set through an environment variable RPYCSVC_<OPTION>, e.g.
RPYCSVC_AUTHKEY, RPYCSVC_WORKERS; the command line wins."""


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``rpycsvc serve`` (rpyc_classic's options mean the same here).

    Every default is None so that ``RPYCSVC_*`` variables can fill what the command line
    leaves out (:meth:`ServerConfig.from_env`); the help therefore states each built-in
    default (the :class:`ServerConfig` field's) in words, and tests/test_help.py checks that
    it says the same as the dataclass."""
    g = p.add_argument_group("listening")
    g.add_argument("--host", default=None,
                   help="address to bind (default: 127.0.0.1, or ::1 with --ipv6)")
    g.add_argument("-p", "--port", type=int, default=None,
                   help=f"port to bind; 0 picks a free one (default: {DEFAULT_PORT})")
    g.add_argument("--ipv6", action="store_true", default=None,
                   help="listen on IPv6 (::1 unless --host names another IPv6 address) "
                   "(default: off)")
    g.add_argument("-m", "--mode", choices=MODES, default=None,
                   help="threaded: a thread per connection; forking: a process per "
                   "connection; oneshot: serve one connection, then exit; stdio: speak over "
                   "stdin/stdout (for ssh). rpycsvc_classic -m oneshot prints 'rpyc-oneshot' "
                   "then HOST<tab>PORT, as rpyc_classic does (default: threaded)")
    w = p.add_argument_group("execution")
    w.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes for tasks; 0 means one per core (default: 0)")
    w.add_argument("--threads", type=int, default=None, metavar="N",
                   help="thread-mode tasks that may run at once; 0 disables thread mode "
                   "(default: 256)")
    w.add_argument("--endpoints", action="append", default=None, metavar="MODULE",
                   help="import MODULE in every worker and offer its @rpycsvc.endpoint "
                   "functions by name; repeatable (default: none)")
    w.add_argument("--service", dest="services", action="append", default=None,
                   metavar="MODULE:CLASS[=NAME]",
                   help="host an instance of CLASS, reachable as conn.root.NAME (NAME "
                   "defaults to the class name in lower case); repeatable (default: none)")
    w.add_argument("--service-scope", choices=("server", "connection"), default=None,
                   help="one hosted instance per server or one per connection "
                   "(default: server)")
    w.add_argument("--memory-limit", type=_size, default=None, metavar="SIZE",
                   help="address-space limit per worker process, e.g. 2G; a task exceeding "
                   "it gets MemoryError (default: 0, no limit)")
    w.add_argument("--no-lanes", dest="lanes", action="store_false", default=None,
                   help="deprecated and ignored: every task takes the one task path now "
                   "(kept for one release so existing command lines still start) (default: off)")
    w.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="seconds running tasks may finish after SIGTERM (default: 10)")
    s = p.add_argument_group("security")
    s.add_argument("--no-classic", dest="classic", action="store_false", default=None,
                   help="service-only mode: registered endpoints (--endpoints) and hosted "
                   "objects (--service) only, no module access, no code or pickles from "
                   "clients; one of those two is then required (default: classic access on)")
    s.add_argument("--authkey", default=None,
                   help="shared secret clients must prove they know (HMAC challenge; the key is "
                   "never sent). Prefer RPYCSVC_AUTHKEY: command lines are visible to others "
                   "(default: none)")
    s.add_argument("--ssl-keyfile", default=None, metavar="FILE",
                   help="TLS private key (PEM); needs --ssl-certfile (default: none, no TLS)")
    s.add_argument("--ssl-certfile", default=None, metavar="FILE",
                   help="TLS certificate (PEM); needs --ssl-keyfile (default: none, no TLS)")
    s.add_argument("--ssl-cafile", default=None, metavar="FILE",
                   help="CA bundle: clients must present a certificate it signed (mutual "
                   "TLS) (default: none, no client certificate asked for)")
    s.add_argument("--insecure", action="store_true", default=None,
                   help="allow a non-loopback bind without TLS or authkey (trusted networks "
                   "only) (default: off)")
    s.add_argument("--handshake-timeout", type=float, default=None, metavar="SECONDS",
                   help="seconds a new connection has to complete TLS/authentication, and a "
                   "plain RPyC client to send its first request (default: 5)")
    s.add_argument("--max-pending", type=int, default=None, metavar="N",
                   help="connections that may be in their handshake at once; when all are "
                   "taken, a newcomer displaces the oldest one that has sent nothing, from "
                   "the host holding the most (default: 64)")
    s.add_argument("--max-message-size", type=_size, default=None, metavar="SIZE",
                   help="largest message accepted from an authenticated client and largest "
                   "reply sent, e.g. 512M, at most 4G minus 1 byte; a task whose arguments "
                   "or result are bigger fails alone with MessageTooLargeError (default: 2G)")
    s.add_argument("--inbound-budget", type=_size, default=None, metavar="SIZE",
                   help="bytes of incoming messages over 64 KiB received at once over all "
                   "connections; beyond it such messages from authenticated clients wait until "
                   "room frees up, and from others are refused; smaller messages never wait "
                   "(default: 4G)")
    s.add_argument("--stall-timeout", type=float, default=None, metavar="SECONDS",
                   help="seconds a client may send nothing in the middle of a large message "
                   "(one holding part of --inbound-budget) before it is dropped and its part "
                   "freed; a slow upload that keeps moving is never dropped (default: 30)")
    r = p.add_argument_group("registry (discovery)")
    r.add_argument("--register", action="store_true", default=None,
                   help="announce this server to an RPyC registry, as CLASSICCOMPUTE and "
                   "SLAVE (COMPUTE with --no-classic) (default: off)")
    r.add_argument("--registry-type", choices=("UDP", "TCP"), default=None,
                   help="how to reach the registry: TCP to one address, or UDP (broadcast "
                   "on the LAN unless --registry-host is given) (default: TCP)")
    r.add_argument("--registry-port", type=int, default=None, metavar="PORT",
                   help="the registry's port (default: 18811)")
    r.add_argument("--registry-host", default=None, metavar="HOST",
                   help="the registry's address (default: none: 127.0.0.1 with TCP, the "
                   "broadcast address 255.255.255.255 with UDP)")
    o = p.add_argument_group("monitoring and logging")
    o.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve Prometheus metrics on http://127.0.0.1:P/metrics "
                   "(default: none, no metrics)")
    o.add_argument("--logfile", default=None, metavar="FILE",
                   help="log to FILE instead of stderr (default: none, stderr)")
    o.add_argument("-q", "--quiet", action="store_true", default=None,
                   help="log errors only, as rpyc_classic -q (default: off)")
    o.add_argument("-v", "--verbose", action="store_true", default=None,
                   help="debug logging (default: off)")
    o.add_argument("--exit-on-stdin-eof", action="store_true", default=None,
                   help="stop (as on SIGTERM) when standard input reaches its end: started "
                   "with a pipe as stdin, the server ends when the process that started it "
                   "does, however it died (Cluster.local uses this) (default: off)")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 2G)") from None


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    names = ("host", "port", "ipv6", "mode", "workers", "threads", "endpoints", "services",
             "service_scope", "memory_limit",
             "grace", "classic", "authkey", "ssl_keyfile", "ssl_certfile", "ssl_cafile",
             "insecure", "handshake_timeout", "max_pending", "max_message_size",
             "inbound_budget", "stall_timeout", "register", "registry_type", "registry_port",
             "registry_host", "logfile", "quiet", "verbose", "metrics_port", "lanes",
             "exit_on_stdin_eof")
    return ServerConfig.from_env(**{n: getattr(args, n, None) for n in names})


def _stop_at_stdin_eof(server: Any) -> None:
    """Stop ``server`` when our stdin ends: the end of a pipe whose writer was the parent
    (``Cluster.local``'s client), closed by the kernel when that process dies, even by
    SIGKILL, which no signal handler would see."""
    import os
    import threading

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass  # nothing is sent on it; anything read is ignored
        except OSError:
            pass
        logging.getLogger("rpycsvc.server").info("stdin closed: shutting down")
        server.request_stop()

    threading.Thread(target=watch, daemon=True, name="rpycsvc-stdin-watch").start()


def setup_logging(cfg: Any) -> None:
    level = logging.DEBUG if cfg.verbose else logging.ERROR if cfg.quiet else logging.INFO
    handler: logging.Handler = (logging.FileHandler(cfg.logfile) if cfg.logfile
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("rpycsvc.rpyc").setLevel(max(level, logging.WARNING))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_serve_arguments(p)


def run(args: argparse.Namespace, *, classic_banner: bool = False) -> int:
    """``rpycsvc serve``: start, print the address, serve until SIGTERM/SIGINT.

    With ``classic_banner`` (``rpycsvc_classic``), oneshot mode prints what
    ``rpyc_classic`` prints there, ``rpyc-oneshot`` then ``HOST<tab>PORT``, which RPyC's
    own tests and scripts parse."""
    from rpycsvc.server.server import Server
    from rpycsvc.server.stdio import serve_stdio

    cfg = config_from_args(args)
    cfg.check_serves_something()
    setup_logging(cfg)
    if cfg.insecure and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("rpycsvc.server").warning(
            "--insecure: anyone who can reach %s:%s can run code as this user", cfg.host, cfg.port)
    if cfg.mode == "stdio":
        if cfg.metrics_port is not None:  # nothing would serve it: refuse, don't ignore
            raise ConfigError("--metrics-port needs a listening server; --mode stdio (a "
                              "deployed server) serves no metrics page: drop --metrics-port")
        serve_stdio(cfg)
        return 0
    server = Server(cfg).start()
    if cfg.metrics_port is not None:
        from rpycsvc.server.metrics import serve_metrics

        try:
            serve_metrics(server, cfg.metrics_port)
        except BaseException:
            server.close(grace=0)
            raise
    # Handlers first: a script may signal us as soon as it has read the address.
    server.install_signal_handlers()
    if cfg.exit_on_stdin_eof:
        _stop_at_stdin_eof(server)
    if classic_banner and cfg.mode == "oneshot":
        print(f"rpyc-oneshot\n{server.host}\t{server.port}", flush=True)
    else:
        print(server.address, flush=True)
    server.serve()
    # Every step of closing is bounded; should it hang all the same, the server still
    # stops: after the grace period and SHUTDOWN_MARGIN more, every thread's stack goes to
    # stderr (what was stuck) and the process exits with code 1.
    import faulthandler

    faulthandler.dump_traceback_later(cfg.grace + SHUTDOWN_MARGIN, exit=True)
    server.close()
    faulthandler.cancel_dump_traceback_later()
    return 0


#: Seconds beyond the grace period after which a server's shutdown that hangs is cut short.
SHUTDOWN_MARGIN = 30.0


def build_parser(load: Collection[str] | None = None) -> argparse.ArgumentParser:
    """``rpycsvc``'s parser, with the full parser of each subcommand named in ``load``.

    ``load=None`` (the default) builds every subcommand's parser, importing every
    subcommand module: what the help tests walk. :func:`main` passes the one command on its
    command line, so the others are only listed (name and one-line help, all that
    ``rpycsvc --help`` shows) and their modules are not imported."""
    from rpycsvc._version import __version__

    parser = argparse.ArgumentParser(
        prog="rpycsvc",
        description="rpycsvc: a remote-execution service for Python built on RPyC.",
    )
    parser.add_argument("--version", action="version", version=f"rpycsvc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, help_text) in COMMANDS.items():
        if load is not None and name not in load:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        if modname != __name__:
            __import__(modname)  # (the import statement's path: -X importtime lists it)
        mod = sys.modules[__name__ if modname == __name__ else modname]
        desc = getattr(mod, "DESCRIPTION", None) if name != "serve" else SERVE_DESCRIPTION
        p = sub.add_parser(name, help=help_text, description=desc or help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _command_named(argv: Sequence[str]) -> set[str]:
    """The subcommand ``argv`` runs: its first word that is not an option (``rpycsvc`` itself
    has only ``--help`` and ``--version``, which take no value), if it names one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return {first} if first in COMMANDS else set()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(load=_command_named(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from rpycsvc.client.output import ending_quietly_if_stdout_closes

    try:
        # A reader that stops early (`rpycsvc bench | head`) ends the command quietly.
        with ending_quietly_if_stdout_closes():
            return int(args._run(args) or 0)
    except RpycsvcError as exc:
        print(f"rpycsvc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def classic_main(argv: list[str] | None = None) -> int:
    """``rpycsvc_classic``: like ``rpyc_classic``, i.e. ``rpycsvc serve`` with its options."""
    parser = argparse.ArgumentParser(prog="rpycsvc_classic", description=SERVE_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args, classic_banner=True)
    except RpycsvcError as exc:
        print(f"rpycsvc_classic: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
