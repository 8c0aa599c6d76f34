"""The notebook magics, driven through IPython's own shell: what you would type in Jupyter.

Each ``run`` below is one notebook cell. ``%load_ext rpycsvc`` adds ``%rpycsvc``,
``%%remote`` (the cell runs on one server, in a Python session of its own there: its
variables stay for the next ``%%remote`` cell, its prints stream into the cell, and the
kernel's interrupt stops it) and ``%%broadcast`` (the cell runs on every server, each line
of output named by its server).

Run it on two local servers, or on servers already running (``rpycsvc serve``)::

    python examples/notebook_magics.py
    python examples/notebook_magics.py host1:18812 host2:18812
"""

from __future__ import annotations

import sys

from IPython.core.interactiveshell import InteractiveShell


def run(shell: InteractiveShell, cell: str) -> None:
    """One notebook cell: show it, run it, stop if it failed."""
    print(f"\n>>> cell:\n{cell.rstrip()}", flush=True)
    result = shell.run_cell(cell, store_history=False)
    sys.stdout.flush()
    if not result.success:
        raise SystemExit(f"the cell failed: {result.error_in_exec or result.error_before_exec}")


def main(argv: list[str]) -> int:
    shell = InteractiveShell.instance()
    run(shell, "%load_ext rpycsvc")
    run(shell, f"%rpycsvc connect {' '.join(argv)}" if argv else "%rpycsvc local 2")
    try:
        # A session on the first server: state stays between %%remote cells.
        run(shell, "%%remote\nimport os, socket\nwords = ['remote', 'cells', 'keep', 'state']\n"
                   "print('session pid', os.getpid(), 'on', socket.gethostname())")
        run(shell, "%%remote\nprint('still there:', ' '.join(words))\nlen(words)")
        # Every server at once, like ipyparallel's %%px.
        run(shell, "%%broadcast\nimport os\nprint('hello from pid', os.getpid())")
        # The cluster is a normal rpycsvc.Cluster in the namespace, as `cluster`.
        run(shell, "squares = list(cluster.map(lambda x: x * x, range(10)))\n"
                   "print('squares:', squares)")
        run(shell, "card = cluster._repr_html_()  # what Jupyter shows for `cluster`\n"
                   "print('HTML card names every server:', "
                   "all(a in card for a in cluster.addresses))")
    finally:
        run(shell, "%rpycsvc close")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
