"""Receive buffers for large frames that arrive as ``bytes``: a new ``bytes`` object filled in
place, so a large ``bytes`` value crosses with one copy (the kernel's) instead of two.

Why: a frame sent from a read-only buffer (a ``bytes`` argument or result) is rebuilt as
``bytes`` on arrival. Read into an anonymous mmap, it then had to be copied once more into
a new ``bytes`` object by the unpickler, which costs a pass over the data *and* a second set
of fresh pages: on a virtual machine first touching a page is expensive (measured here:
~100 ms for 64 MiB), so that copy made a 64 MiB ``bytes`` result markedly slower down
than up (where the worker reads it straight into ``bytes``; ``rpycsvc.server.wire``).

How: ``PyBytes_FromStringAndSize(NULL, n)`` is the C API's way to make a ``bytes`` object
whose contents the creator fills before anyone else sees it. Its memory comes from
``malloc``, which leaves large blocks untouched (so, like the mmap, pages are taken only
as the bytes arrive: a peer announcing gigabytes and sending nothing costs nothing). The
filled object is handed on as a read-only ``memoryview``, the type such frames always had;
:func:`rpycsvc.protocol.serialization.loads` unwraps a view that spans a whole ``bytes``
object instead of copying it.

Where ``ctypes.pythonapi`` is missing (not CPython), :func:`new_bytes` returns None and the
caller keeps using an mmap.
"""

from __future__ import annotations

import ctypes
from typing import Any

_from_size: Any
_as_string: Any
try:
    _from_size = ctypes.pythonapi.PyBytes_FromStringAndSize
    _from_size.restype = ctypes.py_object
    _from_size.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _as_string = ctypes.pythonapi.PyBytes_AsString
    _as_string.restype = ctypes.c_void_p
    _as_string.argtypes = (ctypes.py_object,)
except (AttributeError, OSError):  # not CPython: no C API to call
    _from_size = _as_string = None


def new_bytes(size: int) -> tuple[bytes, memoryview] | None:
    """``(data, view)``: a new ``bytes`` object of ``size`` bytes (contents undefined) and a
    writable byte view of its contents, for the receiver to fill before it hands ``data``
    on; None where that can't be done (then use another buffer).

    The view must not outlive the filling: release it (``view.release()``) before ``data``
    is shared, and never write through it afterwards (``bytes`` are immutable to everyone
    else, and their hash is cached once computed)."""
    if _from_size is None or _as_string is None or size <= 0:
        return None
    data = _from_size(None, size)
    address = _as_string(data)
    if type(data) is not bytes or not address:
        return None
    view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
    return data, view


def whole_bytes(buf: Any) -> bytes | None:
    """The ``bytes`` object ``buf`` is a read-only view of, all of it; None otherwise (so a
    ``bytes`` frame handed on as a view is used as it is, not copied again)."""
    if type(buf) is memoryview:
        base = buf.obj
        if type(base) is bytes and buf.nbytes == len(base) and buf.c_contiguous:
            return base
    return None
