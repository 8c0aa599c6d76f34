"""Everything that crosses the wire by value: functions, arguments, results, errors.

Data is pickled with protocol 5; buffers of at least ``OOB_THRESHOLD`` bytes (numpy arrays
of numbers, contiguous memoryviews) travel out of band as separate frames, so they are never
copied into the pickle stream. The C pickler writes ``bytes`` and ``bytearray`` itself, before
any reducer could hand them over as a buffer, so large ones (at the top of a value or up to
three containers deep) are wrapped first to travel out of band as well. Functions
go through cloudpickle, so lambdas, closures and functions defined in ``__main__`` work. A
packed value is a tuple of ``bytes`` frames: RPyC's brine sends such a tuple by value,
never as a netref.

Code sent by value keeps its file name (see :func:`_reduce_code`), so that a task's
traceback can show its source lines; packing and rebuilding a task's exception is
:mod:`rpycsvc.protocol.tracebacks` (``dump_exception`` and ``load_exception`` stay importable from
here).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import types
import weakref
from collections import ChainMap, OrderedDict
from collections.abc import Sequence
from typing import Any

import cloudpickle

from rpycsvc.errors import SerializationError
from rpycsvc.protocol.buffers import whole_bytes

# re-exported: moved to rpycsvc.protocol.tracebacks, still importable from here
from rpycsvc.protocol.tracebacks import dump_exception as dump_exception
from rpycsvc.protocol.tracebacks import load_exception as load_exception

#: Buffers at least this large travel as their own frame instead of inside the pickle.
OOB_THRESHOLD = 64 * 1024

Frames = tuple[bytes, ...]


def _reduce_memoryview(view: memoryview) -> tuple[Any, tuple[Any, ...]]:
    # cloudpickle turns a memoryview into bytes (a copy, in band, and the type is lost);
    # here a contiguous one travels as a PickleBuffer, out of band when it is large.
    data: Any = pickle.PickleBuffer(view) if view.c_contiguous else view.tobytes()
    return _rebuild_memoryview, (data, view.format, view.shape)


def _rebuild_memoryview(data: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if fmt == "B" and len(shape) == 1:
        return view
    try:
        return view.cast(fmt, shape)  # type: ignore[call-overload]  # any struct format
    except (TypeError, ValueError):  # a format cast() can't express: the raw bytes, then
        return view


_cloudpickle_code_reduce = cloudpickle.Pickler.dispatch_table[types.CodeType]
#: Where ``co_filename`` sits in the arguments of ``types.CodeType`` (Python 3.8 to 3.13).
_CO_FILENAME = 10


def _reduce_code(code: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
    # cloudpickle (3.x) replaces every code object's file name with "<dynamic-code>" so that
    # its pickles don't depend on where a function was defined (IPython cells get a new file
    # name each run). That costs the remote traceback its file name, and with it any way to
    # show the source line; rpycsvc keeps the real name (still deterministic per function).
    rebuild, args = _cloudpickle_code_reduce(code)
    if len(args) > _CO_FILENAME and args[_CO_FILENAME] == "<dynamic-code>":
        args = (*args[:_CO_FILENAME], code.co_filename, *args[_CO_FILENAME + 1:])
    return rebuild, args


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap(
        {memoryview: _reduce_memoryview, types.CodeType: _reduce_code},
        cloudpickle.Pickler.dispatch_table,
    )


def _dumps_bytes(obj: Any, buffers: list[pickle.PickleBuffer]) -> bytes:
    def callback(buf: pickle.PickleBuffer) -> bool:
        # Small buffers stay in band: a frame of their own would cost more than it saves.
        if buf.raw().nbytes < OOB_THRESHOLD:
            return True
        buffers.append(buf)
        return False

    with io.BytesIO() as out:
        _Pickler(out, protocol=5, buffer_callback=callback).dump(obj)
        return out.getvalue()


class _BigBytes:
    """Stands in for a large ``bytes``/``bytearray`` so it pickles as an out-of-band buffer."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        rebuild = _rebuild_bytes if type(self.data) is bytes else _rebuild_bytearray
        return rebuild, (pickle.PickleBuffer(self.data),)


def _rebuild_bytes(buf: Any) -> bytes:
    if type(buf) is bytes:
        return buf
    whole = whole_bytes(buf)  # a bytes frame received as a view of a bytes object: no copy
    return whole if whole is not None else bytes(buf)


def _rebuild_bytearray(buf: Any) -> bytearray:
    return buf if type(buf) is bytearray else bytearray(buf)


def _lift(obj: Any, depth: int = 3) -> Any:
    """``obj`` with its large bytes/bytearrays wrapped in :class:`_BigBytes` (shallowly:
    small tuples, lists and dicts up to ``depth`` deep); ``obj`` itself if it has none."""
    t = type(obj)
    if t is bytes or t is bytearray:
        return _BigBytes(obj) if len(obj) >= OOB_THRESHOLD else obj
    if t not in (tuple, list, dict) or depth <= 0 or len(obj) > 64:
        return obj
    if t is dict:
        values = {k: _lift(v, depth - 1) for k, v in obj.items()}
        return values if any(values[k] is not v for k, v in obj.items()) else obj
    items = [_lift(x, depth - 1) for x in obj]
    return t(items) if any(a is not b for a, b in zip(items, obj)) else obj


def dumps(obj: Any, what: str = "value", copy: bool = True) -> Frames:
    """Pickle ``obj`` by value into frames: ``(pickle, buffer1, buffer2, ...)``.

    ``what`` names the thing in the error message ("argument", "result", ...). With
    ``copy=False`` the buffers are memoryviews of ``obj``'s own memory (for a
    sender that writes them out before ``obj`` can change), not ``bytes`` copies.
    """
    if _is_plain(obj, 2):  # the common small case: C pickle, no cloudpickle machinery
        return (pickle.dumps(obj, protocol=5),)
    buffers: list[pickle.PickleBuffer] = []
    try:
        head = _dumps_bytes(_lift(obj), buffers)
    except Exception as exc:
        raise SerializationError(
            f"can't send {what} {_short_repr(obj)} by value: {type(exc).__name__}: {exc}. "
            "Only picklable objects can travel; open files, sockets, locks and "
            "generators can't — create them inside the task instead."
        ) from exc
    if not buffers:
        return (head,)
    if not copy:
        return (head, *(b.raw() for b in buffers))  # type: ignore[arg-type, unused-ignore]
    return (head, *(bytes(b.raw()) for b in buffers))


_ATOMS = frozenset({type(None), bool, int, float, complex, str})


def _is_plain(obj: Any, depth: int) -> bool:
    """Small, shallow, built-in data only: what plain pickle handles exactly like cloudpickle.

    (Anything else — functions, classes, large or nested data — goes through cloudpickle,
    which pickles ``__main__`` functions by value and buffers out of band.)
    """
    t = type(obj)
    if t in _ATOMS:
        return not (t is str and len(obj) > 4096)
    if depth <= 0 or t not in (tuple, list, dict) or len(obj) > 16:
        return False
    if t is dict:
        return all(_is_plain(k, 0) and _is_plain(v, depth - 1) for k, v in obj.items())
    return all(_is_plain(x, depth - 1) for x in obj)


def loads(frames: Sequence[bytes | bytearray], what: str = "value",
          writable: bool = True) -> Any:
    """Rebuild an object from the frames :func:`dumps` made.

    With ``writable`` (for frames that came through RPyC, which makes every frame
    ``bytes``), ``bytes`` buffers are copied into bytearrays so that numpy arrays come
    back writeable. Frames from :mod:`rpycsvc.server.wire` are ``bytes`` only where the
    sender's buffer was read-only: pass ``writable=False`` and they are used as they are.
    """
    try:
        if writable:
            frames = writable_frames(frames)
        return pickle.loads(frames[0], buffers=frames[1:])
    except Exception as exc:
        raise SerializationError(
            f"can't unpickle {what}: {type(exc).__name__}: {exc}. Is the module that defines "
            "it installed on this side too? Functions and classes from modules are sent by "
            "reference: a server gets your project's modules from the client on demand "
            "(module forwarding); for others, install them there, or call "
            "cloudpickle.register_pickle_by_value(module) to send them by value."
        ) from exc


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every global: what it loads can only be built from pickle's own opcodes
    (numbers, strings, bytes, lists, tuples, dicts, sets, booleans, None)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name in ("_rebuild_bytes", "_rebuild_bytearray"):
            return globals()[name]  # large bytes sent out of band: still plain data
        raise SerializationError(
            f"service-only mode accepts plain data only; the arguments refer to {module}.{name}"
        )


def writable_frames(frames: Sequence[bytes | bytearray]) -> tuple[Any, ...]:
    """``frames`` with their ``bytes`` buffers copied into bytearrays: what arrives through
    RPyC is all ``bytes``, and a numpy array rebuilt on a ``bytes`` buffer is read-only."""
    return (frames[0], *(bytearray(f) if isinstance(f, bytes) else f for f in frames[1:]))


_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def check_memo(data: Any) -> None:
    """Raise :class:`SerializationError` if the pickle ``data`` stores into its memo at an
    index no pickler would write.

    The C unpickler's memo is an array as long as the largest index stored, so a 9-byte
    pickle ``\\x80\\x05N r<4-byte index>.`` makes it allocate 16 bytes per index: gigabytes.
    Picklers number memo entries 0, 1, 2... as they go, so an index is at most the number
    of opcodes before it, and the memo stays within 16 bytes per byte of pickle. (The
    opcodes that store at a given index are ``p`` and ``r``, and ``q`` with a one-byte index;
    a pickle with none of those bytes needs no scan. Protocol 4 and 5 picklers use
    ``MEMOIZE``, whose index is implied, instead.)
    """
    raw = bytes(data)
    if b"p" not in raw and b"r" not in raw:
        return
    try:
        for n, (op, arg, _pos) in enumerate(pickletools.genops(raw)):
            if op.name in _MEMO_PUTS and not (isinstance(arg, int) and 0 <= arg <= n):
                raise SerializationError(
                    f"refused a pickle that stores into its memo at index {arg} after only "
                    f"{n} opcodes (a memory bomb, or not a pickle a pickler wrote)")
            if op.name in _MEMO_GETS and not (isinstance(arg, int) and 0 <= arg < n):
                raise SerializationError(f"malformed pickle: memo index {arg} read before "
                                         "it was stored")
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"malformed pickle: {type(exc).__name__}: {exc}") from exc


def loads_plain(data: bytes | bytearray) -> Any:
    """Unpickle plain data only (no globals): for what a restricted server reads first.
    Bounded: a pickle can't make it allocate more than a small multiple of its size."""
    try:
        check_memo(data)
        return _PlainUnpickler(io.BytesIO(data)).load()
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"malformed message: {type(exc).__name__}: {exc}") from exc


def check_plain(frames: Sequence[bytes | bytearray]) -> None:
    """Raise :class:`SerializationError` unless ``frames`` hold plain data only.

    Used by servers in service-only mode before any worker unpickles client data: a pickle
    with no globals can't run code when loaded, and after :func:`check_memo` it can't make
    the unpickler allocate much more than its own size either.
    """
    check_memo(frames[0])
    try:
        _PlainUnpickler(io.BytesIO(bytes(frames[0])),
                        buffers=[bytes(f) for f in frames[1:]]).load()
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"malformed arguments: {type(exc).__name__}: {exc}") from exc


#: fn -> (cloudpickle's by-value registry when ``fn`` was pickled, the by-reference pickle)
_BY_REFERENCE: weakref.WeakKeyDictionary[Any, tuple[frozenset[str], bytes]] = (
    weakref.WeakKeyDictionary())


def dumps_function(fn: Any) -> bytes:
    """Pickle a task function by value (lambdas and closures included).

    Functions of importable modules pickle to just their module and name; those few bytes
    can't go stale, so they are cached (saves ~30 µs a call) — for as long as cloudpickle's
    by-value registry stays as it was: after ``cloudpickle.register_pickle_by_value(module)``
    (what the "can't unpickle" error suggests) the module's functions travel by value from
    the next call on. Anything pickled by value is pickled anew each time: its globals or
    closure may have changed since.
    """
    registry = cloudpickle.list_registry_pickle_by_value()
    try:
        cached = _BY_REFERENCE.get(fn)
    except TypeError:  # unhashable callables
        cached = None
    if cached is not None and cached[0] == registry:
        return cached[1]
    blob = _dumps_function(fn)
    if len(blob) < 256 and b"cloudpickle" not in blob:
        try:
            _BY_REFERENCE[fn] = (frozenset(registry), blob)
        except TypeError:
            pass  # not weak-referenceable (e.g. builtins): fine, just not cached
    return blob


def _dumps_function(fn: Any) -> bytes:
    if not callable(fn):
        raise SerializationError(
            f"task must be callable, a 'module:function' path or an endpoint name; "
            f"got {_short_repr(fn)}"
        )
    try:
        with io.BytesIO() as out:
            _Pickler(out, protocol=5).dump(fn)  # keeps code file names (see _reduce_code)
            return out.getvalue()
    except Exception as exc:
        raise SerializationError(
            f"can't send task function {_short_repr(fn)} by value: {type(exc).__name__}: {exc}"
        ) from exc


class FunctionCache:
    """Unpickled task functions keyed by their pickled bytes, so repeated calls skip unpickling."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._items: OrderedDict[bytes, Any] = OrderedDict()

    def load(self, blob: bytes) -> Any:
        fn = self._items.get(blob)
        if fn is not None:
            self._items.move_to_end(blob)
            return fn
        try:
            fn = pickle.loads(blob)
        except Exception as exc:
            raise SerializationError(
                f"can't unpickle the task function: {type(exc).__name__}: {exc}. Modules of "
                "the client's project (on its sys.path outside site-packages) are sent on "
                "demand unless it connected with forward_modules=False; for a module the "
                "client can't offer, install it on the server or call "
                "cloudpickle.register_pickle_by_value(module) on the client."
            ) from exc
        self._items[blob] = fn
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return fn


def _short_repr(obj: Any, limit: int = 80) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
