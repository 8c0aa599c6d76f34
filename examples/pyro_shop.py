"""Pyro4-style remote objects: a shop hosted by a server and found through a registry.

With Pyro4 you start a name server, a daemon that registers ``example.shop``, and clients
that call ``Pyro4.Proxy("PYRONAME:example.shop")``. Here the name server is rpycsvc's
registry (RPyC's, bound to 127.0.0.1), the daemon is ``rpycsvc serve --service shop:Shop
--register ...`` (``shop.py`` next to this file is a plain class, hosted once per server),
and a client asks the registry for the servers, picks the one that hosts "shop", and calls
``conn.root.shop``. Two customers on their own connections open accounts, deposit, and
buy; one purchase is refused and the server's ``ValueError`` arrives here; a third
connection sees the shared balances and inventory.

Run it with a registry and a shop server it starts on 127.0.0.1, against a shop server
already running, or through a registry already running (``rpycsvc registry``)::

    python examples/pyro_shop.py
    python examples/pyro_shop.py host:18812
    python examples/pyro_shop.py --registry host:18811
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator

import rpycsvc
from rpycsvc.client.discovery import discover
from rpycsvc.server.registry import start_registry, stop_registry


@contextlib.contextmanager
def local_shop() -> Iterator[str]:
    """A registry and a server hosting ``shop:Shop`` on 127.0.0.1; yields the registry."""
    registry, thread = start_registry("127.0.0.1", port=0)
    try:
        # Cluster.local starts server processes here (with our sys.path, which holds this
        # directory and so shop.py) and stops them when closed.
        with rpycsvc.Cluster.local(1, server_args=[
                "--service", "shop:Shop", "--register", "--registry-type", "TCP",
                "--registry-host", "127.0.0.1", "--registry-port", str(registry.port)]):
            yield f"127.0.0.1:{registry.port}"
    finally:
        stop_registry(registry, thread, timeout=10)


def locate(registry: str, name: str, timeout: float = 15.0) -> str:
    """The address of a server that hosts ``name``, among those the registry knows.

    Servers register in the background, so this asks again until ``timeout``.
    """
    host, _, port = registry.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        for address in discover(host, int(port), timeout=2):
            with rpycsvc.connect(address, timeout=5) as conn:
                if name in conn.root.hosted():
                    return address
        if time.monotonic() > deadline:
            raise TimeoutError(f"no server hosting {name!r} registered at {registry} "
                               f"within {timeout:g} s")
        time.sleep(0.2)


def shop_scenario(address: str) -> None:
    # each customer on a connection of their own, like two Pyro proxies
    with rpycsvc.connect(address, timeout=10) as alice_conn, \
            rpycsvc.connect(address, timeout=10) as bob_conn:
        customers = {"alice": alice_conn.root.shop, "bob": bob_conn.root.shop}
        for name, shop in customers.items():
            try:
                shop.open_account(name)
            except ValueError as exc:  # a shop server that ran this before
                print(f"{name}: {first_line(exc)}")
        for name, amount in [("alice", 50), ("bob", 20)]:
            print(f"{name} deposits {amount} -> balance {customers[name].deposit(name, amount)}")
        for name, item, quantity in [("alice", "book", 2), ("bob", "lamp", 1),
                                     ("bob", "mug", 3), ("alice", "apple", 4)]:
            try:
                left = customers[name].buy(name, item, quantity)
                print(f"{name} buys {quantity} {item} -> {left} left")
            except ValueError as exc:
                print(f"{name} buys {quantity} {item} -> refused: {first_line(exc)}")

    with rpycsvc.connect(address, timeout=10) as conn:  # the state is the server's
        shop = conn.root.shop
        print("balances:", ", ".join(f"{n} {euros}" for n, euros in shop.balances()))
        print("inventory:", ", ".join(f"{item} {price}x{stock}"
                                      for item, price, stock in shop.inventory()))


def first_line(exc: BaseException) -> str:
    """The message of an exception RPyC re-raised (without the remote traceback)."""
    return str(exc).strip().splitlines()[0]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", nargs="?", help="host:port of a server hosting shop:Shop")
    parser.add_argument("--registry", metavar="HOST:PORT", help="a TCP registry to ask")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        address = args.server
        if address is None:
            registry = args.registry or stack.enter_context(local_shop())
            address = locate(registry, "shop")
            print(f"found 'shop' at {address} through the registry at {registry}")
        shop_scenario(address)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
