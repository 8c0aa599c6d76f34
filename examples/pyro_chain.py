"""Pyro4's chain: three servers, each passing a message on to the next, back to the first.

Each server hosts a ``Link`` (``chain.py`` next to this file, ``--service chain:Link``).
The client names the links A, B and C, tells each where the next one is, and gives the
message to A; A calls B, B calls C, and C calls A, which sees the message has been there
and closes the chain. The path comes back with the process id of every hop.

Run it on three local servers, or on three servers already running with
``PYTHONPATH=examples rpycsvc serve --service chain:Link`` that can reach each other::

    python examples/pyro_chain.py
    python examples/pyro_chain.py host1:18812 host2:18812 host3:18812
"""

from __future__ import annotations

import sys

import rpycsvc


def main(argv: list[str]) -> int:
    if argv and len(argv) != 3:
        print("give three server addresses, or none to start three local servers")
        return 2
    # Cluster.local's servers get our sys.path, which holds this directory (chain.py).
    cluster = (rpycsvc.Cluster(argv, require_all=True) if argv else
               rpycsvc.Cluster.local(3, workers=1, server_args=["--service", "chain:Link"]))
    with cluster:
        names = dict(zip(cluster.addresses, "ABC"))
        ring = cluster.addresses[1:] + cluster.addresses[:1]
        for address, next_address in zip(cluster.addresses, ring):
            cluster[address].root.link.join(names[address], next_address)
            print(f"link {names[address]} at {address} passes messages on to "
                  f"{names[next_address]} at {next_address}")
        first = cluster[cluster.addresses[0]]
        path = first.root.link.process("hello")
        print("path:", " -> ".join(f"{name} (pid {pid})" for name, pid in path))
        print(f"the chain is closed: the message came back to {path[-1][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
