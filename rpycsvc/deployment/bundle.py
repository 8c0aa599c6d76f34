"""The bundle: a deterministic zip of pure-Python packages and their byte code, for a host.

The remote loader (:mod:`rpycsvc.deployment.loader`) reads it from the ssh channel's stdin;
nothing of it is written to the host's disk: the host imports it from memory.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path


def build_bundle(packages: Sequence[str]) -> bytes:
    """A deterministic zip of the named pure-Python packages/modules, cached per process.

    Names are resolved in this interpreter; a dotted module also brings its parents'
    ``__init__.py``. Byte code for this interpreter's version rides along (used remotely
    only by the same Python version); compiled extensions are refused (``ConfigError``)
    because they can't be imported from memory.
    """
    return _build_bundle(tuple(packages))


@functools.cache
def _build_bundle(names: tuple[str, ...]) -> bytes:
    files: dict[str, Path] = {}
    for name in names:
        files.update(_package_files(name))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for arcname in sorted(files):
            source = files[arcname].read_bytes()
            _add(zf, arcname, source)
            if arcname.endswith(".py"):
                pyc = _bytecode(source, arcname)
                if pyc is not None:
                    _add(zf, arcname + "c", pyc)
    return out.getvalue()


def _add(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
    zf.writestr(info, data, compresslevel=6)


def _bytecode(source: bytes, arcname: str) -> bytes | None:
    """An unchecked hash-based .pyc (PEP 552) beside each module, so every remote process
    (server and workers) skips compiling the bundle. zipimport uses it only when the magic
    number matches the remote Python's; otherwise it compiles the .py as before."""
    import marshal

    try:
        code = compile(source, arcname, "exec", dont_inherit=True)
    except SyntaxError:
        return None
    flags = (0b01).to_bytes(4, "little")  # hash-based, source not checked
    return (importlib.util.MAGIC_NUMBER + flags + importlib.util.source_hash(source)
            + marshal.dumps(code))


def _package_files(name: str) -> dict[str, Path]:
    from rpycsvc.errors import ConfigError

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot bundle {name!r}: {exc}") from exc
    if spec is None:
        raise ConfigError(f"cannot bundle {name!r}: no such module or package here")
    files: dict[str, Path] = {}
    parts = name.split(".")
    for i in range(1, len(parts)):  # the parents of a dotted name must import too
        parent = importlib.util.find_spec(".".join(parts[:i]))
        if parent and parent.origin and parent.origin.endswith("__init__.py"):
            files["/".join(parts[:i]) + "/__init__.py"] = Path(parent.origin)
    base = "/".join(parts)
    if spec.origin and spec.origin.endswith(".py") and not spec.submodule_search_locations:
        return {**files, base + ".py": Path(spec.origin)}
    if not spec.submodule_search_locations:
        raise ConfigError(f"cannot bundle {name!r}: not pure Python (origin {spec.origin!r})")
    for root in map(Path, spec.submodule_search_locations):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and d[0] != "."]
            for path in (Path(dirpath, f) for f in filenames if f[0] != "."):
                if path.suffix in (".so", ".pyd", ".dylib"):
                    raise ConfigError(f"cannot bundle {name!r}: {path} is a compiled extension")
                if path.suffix not in (".pyc", ".pyo"):
                    files[f"{base}/{path.relative_to(root).as_posix()}"] = path
    return files
