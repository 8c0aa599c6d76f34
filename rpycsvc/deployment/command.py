"""The ``rpycsvc deploy`` command: its arguments; it serves until Ctrl-C, or runs ``--run SCRIPT``.

SCRIPT runs in this (the client's) process, against the cluster :func:`deploy` made; it gets
it from ``rpycsvc.Cluster.deployed()``.
"""

from __future__ import annotations

import argparse
import threading
import time

from rpycsvc.deployment.launcher import attach_command, deploy

DESCRIPTION = """\
Push rpycsvc servers to HOSTs over SSH (nothing but python3 needed there; nothing is
installed on them and no port is opened: each server listens only on a private Unix socket
of yours, removed when it stops, so your other clients can attach over ssh), then serve in
the foreground until Ctrl-C, or run SCRIPT (in this process; it gets the cluster from
rpycsvc.Cluster.deployed()), then tear down.

HOST is [user@]host[:port] or any alias from ~/.ssh/config."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hosts", nargs="+", metavar="HOST", help="[user@]host[:port] or ssh alias")
    p.add_argument("--run", metavar="SCRIPT",
                   help="run this Python script against the deployed cluster (it gets it "
                   "from rpycsvc.Cluster.deployed()), then tear down (default: none, serve "
                   "until Ctrl-C)")
    p.add_argument("--python", default=None,
                   help="python on the hosts (default: python3.X of this Python's version "
                   "if the host has it, else python3)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes per host; 0 means one per core (default: 0)")
    p.add_argument("--endpoints", action="append", default=[], metavar="MODULE",
                   help="import MODULE on every host and offer its @rpycsvc.endpoint "
                   "functions by name; it must be importable there; repeatable "
                   "(default: none)")
    p.add_argument("--no-classic", dest="classic", action="store_false", default=True,
                   help="service-only servers: only the --endpoints functions, no code from "
                   "clients; --endpoints is then required (default: classic access on)")
    p.add_argument("-o", "--ssh-option", dest="ssh_options", action="append", default=[],
                   metavar="OPT",
                   help="extra ssh option, e.g. -o Port=2222; repeatable (default: none)")
    p.add_argument("-F", "--ssh-config", default=None, metavar="FILE",
                   help="ssh config file (default: ssh's own, ~/.ssh/config)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="seconds each host has to start its server (default: %(default)s)")
    p.add_argument("--no-attach", dest="attach", action="store_false", default=True,
                   help="no attach socket on the hosts: only this command reaches the servers "
                   "(default: each server also listens on a private Unix socket of yours, so "
                   "rpycsvc status/top/repl and other scripts can attach over ssh)")
    p.add_argument("--require-all", action="store_true",
                   help="fail unless every host works (default: off: hosts that fail are "
                   "reported and the others used)")


def run(args: argparse.Namespace) -> int:
    import runpy
    import signal
    import sys

    from rpycsvc.client.cluster import (
        _DEPLOYED,  # Cluster.deployed() returns what --run SCRIPT gets
    )

    ssh_options = [x for o in args.ssh_options for x in ("-o", o)]
    if args.ssh_config:
        ssh_options = ["-F", args.ssh_config, *ssh_options]
    t0 = time.monotonic()
    cluster = deploy(args.hosts, python=args.python, workers=args.workers,
                     endpoints=args.endpoints, classic=args.classic, ssh_options=ssh_options,
                     timeout=args.timeout, require_all=args.require_all,
                     attach=getattr(args, "attach", True))
    try:
        took = time.monotonic() - t0
        for host, err in cluster.unreachable.items():
            print(f"{host}: FAILED: {err}", file=sys.stderr)
        print(f"deployed to {len(cluster.clients)} host(s) in {took:.2f} s: "
              f"{', '.join(c.address for c in cluster.clients)}", file=sys.stderr)
        for c in cluster.clients:  # how other clients reach them (rpycsvc.client.attach)
            if c.server_info.get("attach"):
                print(f"{c.address}: attach with: "
                      f"{attach_command(c.server_info['attach'], ssh_options)}",
                      file=sys.stderr)
        if args.run:
            _DEPLOYED.append(cluster)
            try:
                runpy.run_path(args.run, run_name="__main__")
            except SystemExit as exc:
                return int(exc.code or 0) if not isinstance(exc.code, str) else 1
            return 0
        stop = threading.Event()
        # before saying so: a SIGTERM right after "serving" must tear down, not kill us
        signal.signal(signal.SIGTERM, lambda *a: stop.set())
        try:  # a Ctrl-C right after the line (even inside print) must tear down too
            print("serving; Ctrl-C to stop and tear down", file=sys.stderr)
            while not stop.is_set() and cluster.clients:
                stop.wait(0.5)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        cluster.close()
