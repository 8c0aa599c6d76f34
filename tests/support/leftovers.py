"""Did a remote start leave a copy of our code on disk? (For the "nothing written" tests.)"""

from __future__ import annotations

import contextlib
import os
import zipfile
from io import BytesIO
from pathlib import Path


def copies_of(directory: Path, before: set[str], needle: bytes, member: str,
              budget: int = 5000) -> list[str]:
    """Names that appeared in ``directory`` since ``before`` and hold our code: a file
    containing ``needle``, or a zip with ``member``. Other work on the machine may create
    files meanwhile; only copies of ours count. At most ``budget`` files are read."""
    found = []
    for name in sorted(set(os.listdir(directory)) - before):
        path = directory / name
        paths = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()]
        for p in paths:
            budget -= 1
            if budget < 0:
                return found
            with contextlib.suppress(OSError, zipfile.BadZipFile):
                if p.stat().st_size > 16 << 20:  # far larger than any bundle of ours
                    continue
                data = p.read_bytes()
                if needle in data or (data[:4] == b"PK\x03\x04" and member in
                                      zipfile.ZipFile(BytesIO(data)).namelist()):
                    found.append(name)
                    break
    return found
