"""What a pickle refers to, read from its bytes without loading it.

The globals it loads (:func:`pickle_globals`, an opcode walk), whether it rebuilds code by
value with cloudpickle's private helpers (:func:`holds_code_by_value`), and the top-level
names it may refer to by reference (:func:`candidate_modules`, a fast scan). The
environment checks (:mod:`rpycsvc.client.environment`) use them on every task's pickles.
"""

from __future__ import annotations

import pickletools
import re
from typing import Any

#: What a by-value pickle refers to and no by-reference pickle does: cloudpickle's module.
_CLOUDPICKLE = b"cloudpickle"

_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                         "SHORT_BINSTRING", "BINSTRING", "STRING"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_SILENT_OPS = frozenset({"PROTO", "FRAME", "STOP"})  # push nothing


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """The ``(module, name)`` of every global a pickle loads (``GLOBAL``, ``STACK_GLOBAL``,
    ``INST``), found by walking its opcodes (never by loading it).

    ``STACK_GLOBAL`` takes its two strings from the stack; they are the two values pushed
    last (straight, or from the memo), which is all this walk tracks.
    """
    found: list[tuple[str, str]] = []
    memo: dict[int, Any] = {}
    pushed: list[Any] = [None, None]
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in _STRING_OPS:
            pushed.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1]
        elif name in _PUT_OPS:
            memo[int(arg)] = pushed[-1]  # type: ignore[arg-type]
        elif name in _GET_OPS:
            pushed.append(memo.get(int(arg)))  # type: ignore[arg-type]
        elif name == "STACK_GLOBAL":
            module, attr = pushed[-2], pushed[-1]
            if isinstance(module, str) and isinstance(attr, str):
                found.append((module, attr))
            pushed.append(None)
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append((module, attr))
            pushed.append(None)
        elif name not in _SILENT_OPS:
            pushed.append(None)
        if len(pushed) > 8:
            del pushed[:-2]
    return found


#: cloudpickle's reconstructors of code (functions, classes, code objects), past and present
_CODE_BUILDERS = frozenset({"_make_function", "_make_skel_func", "_fill_function",
                            "_make_skeleton_class", "_make_skeleton_enum",
                            "_rehydrate_skeleton_class", "_builtin_type"})


def holds_code_by_value(data: bytes, any_helper: bool = False) -> bool:
    """Whether the pickle ``data`` rebuilds a function or class by value: it loads one of
    cloudpickle's private reconstructors of code (``_make_function``,
    ``_make_skeleton_class``, ``_builtin_type``...); with ``any_helper``, any private
    helper of cloudpickle (``_make_dict_keys`` too), none of which another major version
    of cloudpickle need have. By-reference pickles never name cloudpickle, so the opcode
    walk runs only for pickles that contain the word."""
    if _CLOUDPICKLE not in data:
        return False
    try:
        return any(module.split(".")[0] == "cloudpickle" and attr.startswith("_") and
                   (any_helper or attr in _CODE_BUILDERS)
                   for module, attr in pickle_globals(data))
    except Exception:  # not a pickle we can walk: the server will say what is wrong with it
        return False


#: A string of a protocol 4/5 pickle that looks like a dotted name, memoized as pickle
#: memoizes every module and attribute name of a global: SHORT_BINUNICODE, its length,
#: the name, MEMOIZE. (The length is checked after the match.)
_NAME = re.compile(rb"\x8c([\x01-\xff])([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\x94")


def candidate_modules(data: bytes | bytearray | memoryview) -> set[str]:
    """Top-level names in the pickle ``data`` that may be modules it refers to by reference.

    A fast, C-speed scan: every memoized short string shaped like a dotted name counts (a
    dict key ``"numpy"`` too), so this over-approximates; what is not an installed
    distribution's module is dropped later, off the send path. Pickles that load no global
    at all (no ``STACK_GLOBAL`` byte, ``\\x93``) are not scanned.
    """
    raw = data if isinstance(data, bytes) else bytes(data)
    if 0x93 not in raw:
        return set()
    return {m.group(2).decode() for m in _NAME.finditer(raw)
            if m.group(1)[0] == len(m.group(2)) + len(m.group(3))}
