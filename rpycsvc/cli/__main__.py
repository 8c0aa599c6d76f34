"""``python -m rpycsvc.cli``: the ``rpycsvc`` command, as before the package had folders."""

import sys

from rpycsvc.cli.main import main

sys.exit(main())
