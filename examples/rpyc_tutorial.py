"""RPyC's classic tutorial, unchanged, on an rpycsvc server.

An rpycsvc server speaks RPyC's classic protocol, so the tutorial's plain
``rpyc.classic.connect`` works: remote modules (``conn.modules.sys``), ``conn.eval`` and
``conn.execute``. A ``print`` executed on the server goes to the server's stdout until
the client sets ``conn.modules.sys.stdout = sys.stdout``; then it arrives here. (rpycsvc's
own tasks need no redirection: their output is sent back to the client that ran them.)

Run it on a local server it starts, or on a server already running (``rpycsvc serve``)::

    python examples/rpyc_tutorial.py
    python examples/rpyc_tutorial.py host:18812
"""

from __future__ import annotations

import contextlib
import os
import sys

import rpyc

import rpycsvc


def tutorial(host: str, port: int) -> None:
    conn = rpyc.classic.connect(host, port)
    try:
        rsys, ros = conn.modules.sys, conn.modules.os
        print(f"connected to {host}:{port} with rpyc.classic.connect")
        print(f"server: pid {ros.getpid()}, Python {rsys.version.split()[0]}, "
              f"cwd {ros.getcwd()} (this client: pid {os.getpid()})")
        print(f"conn.eval('1 + 2') = {conn.eval('1 + 2')}")
        conn.execute("import os")
        conn.execute("print('Hello from the server, on its own stdout')")
        print("that print went to the server's stdout; now redirecting it here")
        saved = rsys.stdout
        rsys.stdout = sys.stdout  # the tutorial's line: the server writes to our stdout
        try:
            conn.execute("print('Hello World, printed by server pid', os.getpid())")
        finally:
            rsys.stdout = saved  # the server's stdout is shared by all its clients
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    with contextlib.ExitStack() as stack:
        if not argv:  # start a server here (rpycsvc serve --port 0), stopped on the way out
            argv = [stack.enter_context(rpycsvc.Cluster.local(1)).addresses[0]]
        host, _, port = argv[0].rpartition(":")
        tutorial(host, int(port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
