"""A tiny entry point for ``rpycsvc.deployment.bootstrap`` tests: echoes length-prefixed frames.

Frames are ``>Q`` length + payload. The first frame it sends is its pid. A payload starting
with ``CMD_PREFIX`` is a command (see ``_command``); anything else comes back unchanged.
Returns 0 on EOF, the teardown signal the loader relies on.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
from typing import IO

CMD_PREFIX = b"\x00cmd:"
# Tests look for this text in new files: a copy of the bundle on disk would contain it.
MARKER = "rpycsvc-echo-entry-marker-5f0c2a"


def read_frame(rfile: IO[bytes]) -> bytes | None:
    """One frame, or None on a clean EOF between frames."""
    head = rfile.read(8)
    if not head:
        return None
    if len(head) < 8:
        raise EOFError("EOF inside a frame header")
    (size,) = struct.unpack(">Q", head)
    data = rfile.read(size)
    if len(data) < size:
        raise EOFError("EOF inside a frame")
    return data


def write_frame(wfile: IO[bytes], data: bytes) -> None:
    wfile.write(struct.pack(">Q", len(data)) + data)
    wfile.flush()


def exchange(wfile: IO[bytes], rfile: IO[bytes], payload: bytes | None, timeout: float) -> bytes:
    """Test side: send ``payload`` (unless None), read one frame; bounded by ``timeout``.

    Raises ``TimeoutError`` (the caller should then close the channel, which unblocks the
    helper thread) or ``EOFError`` if the peer closed the channel.
    """
    result: list[bytes | BaseException | None] = []

    def run() -> None:
        try:
            if payload is not None:
                write_frame(wfile, payload)
            result.append(read_frame(rfile))
        except BaseException as exc:
            result.append(exc)

    worker = threading.Thread(target=run, name="echo-exchange", daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        raise TimeoutError(f"no frame within {timeout} s")
    if isinstance(result[0], BaseException):
        raise result[0]
    if result[0] is None:
        raise EOFError("the peer closed the channel")
    return result[0]


def _command(name: str) -> bytes:
    if name == "stray-output":
        # All three would corrupt the channel if the loader had left it on fd 1.
        print("stray print")
        os.write(1, b"stray write to fd 1\n")
        subprocess.run(["echo", "stray child output"], check=True, timeout=10)
        return b"done"
    if name == "hang":
        # A stuck entry that never sees EOF: only the loader's parent-death signal ends it.
        time.sleep(60)
        return b"woke up"
    if name == "child-import":
        # A child interpreter must find the bundle through the inherited PYTHONPATH.
        out = subprocess.run(
            [sys.executable, "-c", "import tests.support.echo_entry as m; print(m.MARKER)"],
            capture_output=True,
            timeout=30,
        )
        return out.stdout.strip() or out.stderr[-500:]
    if name == "info":
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        return json.dumps(
            {
                "pid": os.getpid(),
                "file": __file__,
                "fds": fds,
                "path0": sys.path[0],
                "bundle_fd": os.environ.get("RPYCSVC_BUNDLE_FD"),
            }
        ).encode()
    return b"unknown command " + name.encode()


def main(rfile: IO[bytes], wfile: IO[bytes]) -> int:
    """Echo until EOF; then return so the remote process exits."""
    write_frame(wfile, str(os.getpid()).encode())
    while (frame := read_frame(rfile)) is not None:
        if frame.startswith(CMD_PREFIX):
            frame = _command(frame[len(CMD_PREFIX) :].decode())
        write_frame(wfile, frame)
    return 0
