"""Runs notebook cells in IPython's own shell (no kernel): ``python -u ipython_driver.py
CELLS_JSON``. After each cell it prints ``@@ cell N: ok`` or ``@@ cell N: error TYPE``
(``KeyboardInterrupt`` for any interrupt), so a test can follow it line by line and send it
SIGINT mid-cell as a terminal's Ctrl-C or a kernel's interrupt would."""

from __future__ import annotations

import json
import sys

from IPython.core.interactiveshell import InteractiveShell


def main(cells: list[str]) -> int:
    shell = InteractiveShell.instance()
    for n, cell in enumerate(cells):
        result = shell.run_cell(cell, store_history=False)
        err = result.error_in_exec or result.error_before_exec
        if err is None:
            status = "ok"
        elif isinstance(err, KeyboardInterrupt):
            status = "error KeyboardInterrupt"
        else:
            status = f"error {type(err).__name__}"
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"@@ cell {n}: {status}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
