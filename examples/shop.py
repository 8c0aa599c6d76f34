"""The shop of ``pyro_shop.py``: a plain class that an rpycsvc server hosts.

Start a server that hosts one shop for all its clients (``--service-scope connection``
would give each connection its own)::

    PYTHONPATH=examples rpycsvc serve --service shop:Shop

Clients reach it as ``conn.root.shop`` and call its public methods through RPyC.
Arguments and results are plain values (numbers, strings, tuples), so what a client gets
back is a copy, never a reference into the server. Errors are ``ValueError`` with a
message that says what went wrong; RPyC raises them again on the client.
"""

from __future__ import annotations

import threading

#: item -> (price in euros, items in stock)
STOCK = {"apple": (1, 50), "book": (12, 5), "lamp": (30, 2), "mug": (5, 10)}


class Shop:
    """Accounts with balances, an inventory, and purchases that move money and stock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # many clients call at once, each in its own thread
        self._prices = {item: price for item, (price, _) in STOCK.items()}
        self._stock = {item: count for item, (_, count) in STOCK.items()}
        self._accounts: dict[str, int] = {}

    def open_account(self, name: str) -> None:
        with self._lock:
            if name in self._accounts:
                raise ValueError(f"{name!r} already has an account")
            self._accounts[name] = 0

    def deposit(self, name: str, amount: int) -> int:
        """Add ``amount`` euros to ``name``'s account; returns the new balance."""
        if not isinstance(amount, int) or amount <= 0:
            raise ValueError(f"deposit must be a positive whole number of euros; got {amount!r}")
        with self._lock:
            self._account(name)
            self._accounts[name] += amount
            return self._accounts[name]

    def buy(self, name: str, item: str, quantity: int = 1) -> int:
        """``name`` buys ``quantity`` of ``item``; returns what is left on the account."""
        with self._lock:
            balance = self._account(name)
            if item not in self._prices:
                raise ValueError(f"no {item!r} in this shop; it sells {', '.join(self._prices)}")
            if self._stock[item] < quantity:
                raise ValueError(f"only {self._stock[item]} {item} left; {name} wants {quantity}")
            cost = self._prices[item] * quantity
            if cost > balance:
                raise ValueError(f"{name} has {balance} euros; {quantity} {item} cost {cost}")
            self._stock[item] -= quantity
            self._accounts[name] = balance - cost
            return self._accounts[name]

    def balance(self, name: str) -> int:
        with self._lock:
            return self._account(name)

    def balances(self) -> tuple[tuple[str, int], ...]:
        """``((name, euros), ...)`` for every account, by name."""
        with self._lock:
            return tuple(sorted(self._accounts.items()))

    def inventory(self) -> tuple[tuple[str, int, int], ...]:
        """``((item, price, in stock), ...)``, by item."""
        with self._lock:
            return tuple((item, self._prices[item], self._stock[item])
                         for item in sorted(self._prices))

    def _account(self, name: str) -> int:
        try:
            return self._accounts[name]
        except KeyError:
            raise ValueError(f"no account for {name!r}; open one first") from None
