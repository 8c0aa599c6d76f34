"""A task's exception, packed on the worker and rebuilt on the client, with a traceback that
reads like a local one.

The worker's own frames (``rpycsvc/server/worker.py`` and friends) are cut from the top of each
traceback; frames of code the client sent by value keep their file name (cloudpickle would
replace it, see :func:`rpycsvc.protocol.serialization._reduce_code`) but lose the server's
source line,
since the server's file of that name, if any, need not be the one the code came from; the
client fills those lines in from its own files. The exception itself travels pickled when it
rebuilds, else as a :class:`~rpycsvc.errors.RemoteTaskError` carrying its type and text.
"""

from __future__ import annotations

import builtins
import linecache
import pickle
import re
import sys
import traceback
import types
from typing import Any

import cloudpickle

from rpycsvc.errors import RemoteTaskError, RemoteTraceback

#: A packed exception: a tuple of ``bytes`` frames, as :mod:`rpycsvc.protocol.serialization` sends
#: values (RPyC's brine sends such a tuple by value, never as a netref).
Frames = tuple[bytes, ...]


def dump_exception(exc: BaseException) -> Frames:
    """Pack an exception raised by a task: the object itself if it pickles, plus its text.

    The frames are ``(type qualname, message, traceback text, pickled exception or b"",
    files of code sent by value)``. The traceback text reads as a local one would: the
    worker's own frames (``rpycsvc/server/worker.py`` and friends) are cut from the top, and frames
    of code the client sent by value carry no source line, because the server's file of
    that name, if it has one, need not be the one the code came from; :func:`load_exception`
    fills those lines in from the client's files (the last frame names them, ``\\0``-separated).
    """
    shipped, internal = _classify_files(exc)
    tb_text = _format_task_traceback(exc, shipped, internal)
    typ = type(exc)
    qualname = f"{typ.__module__}.{typ.__qualname__}"
    try:
        blob = cloudpickle.dumps(exc, protocol=5)
        pickle.loads(blob)  # only ship what rebuilds; some exceptions pickle but won't load
    except Exception:
        blob = b""
    return (qualname.encode(), _safe_str(exc).encode(), tb_text.encode(), blob,
            "\0".join(sorted(shipped)).encode(errors="surrogateescape"))


_ExceptionGroup: Any = getattr(builtins, "BaseExceptionGroup", None)  # Python 3.11+


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception chained to it (causes, contexts, members of groups)."""
    found: list[BaseException] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        found.append(e)
        todo += [e.__cause__, e.__context__]
        if _ExceptionGroup is not None and isinstance(e, _ExceptionGroup):
            todo += list(e.exceptions)
    return found


def _is_shipped(frame: types.FrameType) -> bool:
    """Whether ``frame`` runs code that was unpickled by value (sent by the client).

    Such code runs with globals of its own, rebuilt by cloudpickle, where code of a module
    imported here runs in that module's namespace.
    """
    g = frame.f_globals
    name = g.get("__name__")
    module = sys.modules.get(name) if isinstance(name, str) else None
    return getattr(module, "__dict__", None) is not g


def _is_rpycsvc(frame: types.FrameType) -> bool:
    """Whether ``frame`` runs rpycsvc's own code (the worker's, say), told by its module's
    name, not its file name: a deployed server runs rpycsvc from an in-memory bundle whose
    file names are relative, and the worker module runs as ``__main__``."""
    g = frame.f_globals
    spec = g.get("__spec__")
    name = getattr(spec, "name", None) or g.get("__name__")
    return isinstance(name, str) and (name == "rpycsvc" or name.startswith("rpycsvc."))


def _classify_files(exc: BaseException) -> tuple[set[str], set[str]]:
    """The file names of the frames, in ``exc``'s tracebacks, of code sent by value, and
    those of rpycsvc's own code."""
    shipped: set[str] = set()
    internal: set[str] = set()
    for e in _chain(exc):
        for frame, _ in traceback.walk_tb(e.__traceback__):
            if _is_shipped(frame):
                shipped.add(frame.f_code.co_filename)
            elif _is_rpycsvc(frame):
                internal.add(frame.f_code.co_filename)
    return shipped, internal


def _format_task_traceback(exc: BaseException, shipped: set[str],
                           internal: set[str]) -> str:
    """``exc`` formatted as :func:`traceback.format_exception` does, less the worker's frames
    on top of each traceback and the (server-side) source lines of ``shipped`` files."""
    try:
        top = traceback.TracebackException(type(exc), exc, exc.__traceback__,
                                           lookup_lines=False)
        todo: list[Any] = [top]
        seen: set[int] = set()
        while todo:
            te = todo.pop()
            if te is None or id(te) in seen:
                continue
            seen.add(id(te))
            te.stack = traceback.StackSummary.from_list(
                _task_frames(te.stack, shipped, internal))
            todo += [te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ())]
        return "".join(top.format())
    except Exception:  # formatting must not lose the task's error: the plain text, then
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _task_frames(stack: list[traceback.FrameSummary], shipped: set[str],
                 internal: set[str]) -> list[traceback.FrameSummary]:
    frames = list(stack)
    start = 0
    while start < len(frames) and frames[start].filename in internal:
        start += 1
    if start == len(frames):  # rpycsvc's own error (bad arguments, no such endpoint): keep all
        start = 0
    return [traceback.FrameSummary(f.filename, f.lineno, f.name, lookup_line=False, line="")
            if f.filename in shipped else f
            for f in frames[start:]]


#: A frame's line in a formatted traceback: ``<indent>File "name", line N, in function``.
_FRAME_LINE = re.compile(r'(?P<indent>[ |]*)File "(?P<file>.+)", line (?P<line>\d+), in ')


def _with_client_source(text: str, shipped: set[str]) -> str:
    """``text`` with the source line of each frame of a ``shipped`` file that has none,
    from the client's own copy of the file (as a local traceback shows it: its content now,
    should it have been edited since the task was sent)."""
    if not shipped:
        return text
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        m = _FRAME_LINE.match(line)
        if m is None or m["file"] not in shipped:
            continue
        source_indent = m["indent"] + "  "
        if i + 1 < len(lines) and lines[i + 1].startswith(source_indent):
            continue  # it has its source line already
        linecache.checkcache(m["file"])
        source = linecache.getline(m["file"], int(m["line"])).strip()
        if source:
            out.append(f"{source_indent}{source}\n")
    return "".join(out)


def load_exception(frames: Frames | list[bytes], address: str | None) -> BaseException:
    r"""Rebuild a task's exception: its own type where possible, else :class:`RemoteTaskError`
    (always for ``BaseException``\ s that aren't ``Exception``\ s, such as ``SystemExit``).

    The remote traceback is attached as ``__cause__`` (a :class:`RemoteTraceback`) and as
    ``remote_traceback``; ``address`` names the server in both cases. Frames of code this
    side sent by value get their source lines from this side's files.
    """
    qualname, message, tb_text, blob = (bytes(f) for f in frames[:4])
    shipped = (set(bytes(frames[4]).decode(errors="surrogateescape").split("\0"))
               if len(frames) > 4 and frames[4] else set())
    text = _with_client_source(tb_text.decode(errors="replace"), shipped)
    exc: BaseException | None = None
    if blob:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    # SystemExit, KeyboardInterrupt and GeneratorExit ended the task, not the client: raised
    # here they would end the client's program, so they arrive as RemoteTaskError.
    if not isinstance(exc, Exception):
        return RemoteTaskError(
            message.decode(errors="replace"),
            remote_type=qualname.decode(errors="replace"),
            remote_traceback=text,
            address=address,
        )
    try:
        exc.remote_traceback = text  # type: ignore[attr-defined]
        exc.address = address  # type: ignore[attr-defined]
        exc.__cause__ = RemoteTraceback(f"on {address}:\n{text}" if address else text)
    except (AttributeError, TypeError):
        pass  # exceptions with __slots__ keep their type but not the extras
    return exc


def _safe_str(obj: Any) -> str:
    try:
        return str(obj)
    except Exception:
        return f"<unprintable {type(obj).__name__}>"
