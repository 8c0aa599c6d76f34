"""Remote tracebacks that point at the user's code (issue 17): a task's traceback shows the
frames of the user's functions — file name, line and source line, as a local traceback
would — and none of the worker's own; and ``cloudpickle.register_pickle_by_value``, the fix
the "can't unpickle" error suggests, takes effect in the same process.

All against real servers; the failing functions live in a real file
(tests/support/tb_helpers.py), or in a module made in a temporary directory.
"""

from __future__ import annotations

import importlib
import linecache
import re
import sys
import textwrap
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, NamedTuple

import cloudpickle
import pytest

import rpycsvc
from tests.support import tb_helpers
from tests.support.servers import ServerProcess
from tests.support.sshd import SshServer

WAIT = 60.0
HELPERS = tb_helpers.entry.__code__.co_filename  # what a local traceback names the file


class Frame(NamedTuple):
    file: str
    line: int
    name: str
    source: str | None  # the source line shown under it, if any


_FRAME = re.compile(r'(?P<indent>\s*)File "(?P<file>.+)", line (?P<line>\d+), in (?P<name>.+)$')
_CARETS = re.compile(r"\s*[\^~]+\s*$")  # Python 3.11+'s markers under a source line


def frames_of(text: str) -> list[Frame]:
    """The frames a formatted traceback shows, in order, with their source lines."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        m = _FRAME.match(line)
        if m is None:
            continue
        source = None
        if i + 1 < len(lines):
            below = lines[i + 1]
            if below.startswith(m["indent"] + "  ") and not _CARETS.match(below):
                source = below.strip()
        found.append(Frame(m["file"], int(m["line"]), m["name"], source))
    return found


def local_frames(fn: Callable[..., Any], *args: Any, file: str) -> list[Frame]:
    """The frames in ``file`` of the traceback ``fn(*args)`` raises here, in this process."""
    try:
        fn(*args)
    except Exception as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return [f for f in frames_of(text) if f.file == file]
    raise AssertionError(f"{fn.__name__}{args} did not raise")


def marker_line(name: str) -> int:
    """The line number of ``# marker: <name>`` in tests/support/tb_helpers.py."""
    for number, line in enumerate(Path(HELPERS).read_text().splitlines(), start=1):
        if line.rstrip().endswith(f"# marker: {name}"):
            return number
    raise AssertionError(f"no marker {name!r} in {HELPERS}")


def helper_frame(name: str) -> Frame:
    line = marker_line(name)
    return Frame(HELPERS, line, name, linecache.getline(HELPERS, line).strip())


@pytest.fixture
def helpers_by_value() -> Iterator[None]:
    """tests/support/tb_helpers.py travels by value, as a module the server lacks would."""
    cloudpickle.register_pickle_by_value(tb_helpers)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(tb_helpers)


def assert_points_at_user_code(exc: BaseException, want: list[Frame]) -> None:
    remote = exc.remote_traceback  # type: ignore[attr-defined]
    assert frames_of(remote) == want, remote
    assert "<dynamic-code>" not in remote
    # the whole report a user sees: the client's own frames, then the remote traceback
    # (the __cause__), with nothing of the worker's in between
    shown = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    assert remote.rstrip() in shown
    assert "rpycsvc/server/worker.py" not in shown and "rpycsvc/_worker" not in shown, shown


def test_function_sent_by_value_shows_file_line_and_source(
        client: rpycsvc.Client, helpers_by_value: None) -> None:
    with pytest.raises(ValueError, match="innermost failed on 6") as info:
        client.compute(tb_helpers.entry, 3)
    want = [helper_frame("entry"), helper_frame("middle"), helper_frame("innermost")]
    assert local_frames(tb_helpers.entry, 3, file=HELPERS) == want  # what a local one shows
    assert_points_at_user_code(info.value, want)


def test_the_same_through_the_server_and_in_a_batched_map(
        server: rpycsvc.Server, helpers_by_value: None) -> None:
    """A task of a client and items of a batched map (a Cluster's) fail the same way: the
    worker's own frames (``run``, ``_run_batch``) are cut as well."""
    want = [helper_frame("entry"), helper_frame("middle"), helper_frame("innermost")]
    with rpycsvc.connect(server.address) as c:
        with pytest.raises(ValueError, match="innermost failed on 6") as info:
            c.compute(tb_helpers.entry, 3)
        assert_points_at_user_code(info.value, want)
    with rpycsvc.Cluster([server.address]) as cluster:
        results = cluster.map(tb_helpers.entry, [3, 3, 3, 3], chunksize=2)
        with pytest.raises(ValueError, match="innermost failed on 6") as info:
            next(iter(results))
        assert_points_at_user_code(info.value, want)


@pytest.mark.ssh
def test_a_deployed_server_cuts_its_worker_frames_too(sshd: SshServer,
                                                     helpers_by_value: None) -> None:
    """``rpycsvc.deploy`` runs rpycsvc from an in-memory bundle, whose file names are
    relative ("rpycsvc/server/worker.py"): the worker's frames are cut all the same."""
    options = ["-F", str(sshd.config_path)]
    with rpycsvc.deploy([sshd.alias], ssh_options=options, timeout=30) as cluster, \
            pytest.raises(ValueError, match="innermost failed on 6") as info:
        cluster.submit(tb_helpers.entry, 3).result(timeout=WAIT)
    assert_points_at_user_code(
        info.value, [helper_frame("entry"), helper_frame("middle"), helper_frame("innermost")])
    assert "rpycsvc/server/worker.py" not in info.value.remote_traceback  # type: ignore[attr-defined]


def test_chained_exceptions_sent_by_value_show_their_source_too(
        client: rpycsvc.Client, helpers_by_value: None) -> None:
    with pytest.raises(RuntimeError, match=r"entry\(2\) failed") as info:
        client.compute(tb_helpers.rewrapped, 2)
    want = local_frames(tb_helpers.rewrapped, 2, file=HELPERS)
    assert [f.name for f in want] == ["rewrapped", "entry", "middle", "innermost", "rewrapped"]
    assert all(f.source for f in want)
    assert_points_at_user_code(info.value, want)
    assert "The above exception was the direct cause" in info.value.remote_traceback  # type: ignore[attr-defined]


def test_function_sent_by_reference_has_no_worker_frames(client: rpycsvc.Client) -> None:
    """The server imports tests.support.tb_helpers itself: its own lines, and nothing above."""
    with pytest.raises(ValueError, match="innermost failed on 6") as info:
        client.compute(tb_helpers.entry, 3)
    assert_points_at_user_code(
        info.value, [helper_frame("entry"), helper_frame("middle"), helper_frame("innermost")])


def test_notebook_cell_source_comes_from_the_client(client: rpycsvc.Client,
                                                    tmp_path: Path) -> None:
    """Code whose source only the client has (an IPython cell: a file name that exists in
    the client's linecache, not on disk) still gets its source lines: the client fills them in."""
    cell = str(tmp_path / "cell_17.py")  # never written: neither side has the file
    source = textwrap.dedent("""\
        def cell_task(n):
            total = n + 1
            raise KeyError(f"cell key {total}")
        """)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(source, cell, "exec"), namespace)
    linecache.cache[cell] = (len(source), None, source.splitlines(keepends=True), cell)
    try:
        with pytest.raises(KeyError, match="cell key 5") as info:
            client.compute(namespace["cell_task"], 4)
        assert_points_at_user_code(
            info.value, [Frame(cell, 3, "cell_task", 'raise KeyError(f"cell key {total}")')])
    finally:
        linecache.cache.pop(cell, None)


def test_register_pickle_by_value_takes_effect_in_the_same_process(
        server_process: type[ServerProcess], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The "can't unpickle" error's advice works at once: a module the server can't import
    fails by reference, then travels by value once registered (no stale cached pickle)."""
    (tmp_path / "client_only_tb17.py").write_text(textwrap.dedent("""\
        def triple(x):
            return 3 * x
        """))
    monkeypatch.syspath_prepend(str(tmp_path))  # the client's path only: not the server's
    srv = server_process("--workers", "1")
    module = importlib.import_module("client_only_tb17")
    try:
        # (forwarding off: with it, the server would get the module from us on import)
        with rpycsvc.connect(srv.address, forward_modules=False) as c:
            with pytest.raises(rpycsvc.SerializationError, match="can't unpickle"):
                c.compute(module.triple, 5)
            cloudpickle.register_pickle_by_value(module)
            try:
                assert c.compute(module.triple, 5) == 15
                assert c.submit(module.triple, 7).result(timeout=WAIT) == 21
            finally:
                cloudpickle.unregister_pickle_by_value(module)
            # and back: unregistered, it goes by reference again, and fails again
            with pytest.raises(rpycsvc.SerializationError, match="can't unpickle"):
                c.compute(module.triple, 5)
    finally:
        sys.modules.pop("client_only_tb17", None)
