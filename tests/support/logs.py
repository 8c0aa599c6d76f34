"""A logging handler that keeps what it is given (for tests of log forwarding)."""

from __future__ import annotations

import logging


class Collect(logging.Handler):
    """Keeps every record it handles in ``records``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
