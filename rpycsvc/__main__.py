"""``python -m rpycsvc``: the ``rpycsvc`` command (see ``rpycsvc --help``)."""

import sys

from rpycsvc.cli.main import main

sys.exit(main())
