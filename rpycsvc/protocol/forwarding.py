"""Module forwarding: a worker imports the client's own modules it lacks, from the client.

A task's function, arguments and results refer to functions and classes of modules *by
name* (pickle's rule; cloudpickle sends only ``__main__`` and lambdas by value). When such a
module is part of the user's project and not installed on the server, unpickling the task
used to fail with ``ModuleNotFoundError``. As in Mitogen, the worker now asks the client for
it, during the import, and imports the answer in memory.

The two ends: the client answers requests with a
:class:`~rpycsvc.protocol.module_provider.ModuleProvider`, and a worker imports what it
lacks through a :class:`~rpycsvc.protocol.module_finder.ForwardedModules` finder. This
module holds what both share: the requests and their replies.

Forwarded modules are keyed by content. The client keeps the digest (a hash of the bytes)
of every module it has sent, and a *version* number that goes up whenever one of those
changes on disk (looked for before each task: a ``stat`` per module, and a hash when the
file's time or size moved); every task carries the client's token and that version: a few
bytes, however large the project. Before the task runs, a worker that holds forwarded
modules of another client, or of an older version, drops every forwarded module (and its
cache of unpickled functions): the task's imports then fetch the current files. So an edited
module is used from the next task on, and a worker never runs one client's task with
another client's code. Modules are dropped rather than the worker restarted, so that two
clients taking turns on a server don't pay a worker start (a few hundred ms) per turn; what
a dropped module did to the rest of the process (registered itself with an installed
library, say) stays until the worker is replaced.
"""

from __future__ import annotations

from typing import Any

#: What a module request is answered with (plain tuples: RPyC's brine and pickle carry them):
#: ``("module", name, is_package, filename, "source"|"pyc"|"namespace", data, digest)``,
#: ``("none", name)`` (not the client's to give: the import goes on as if not found) or
#: ``("error", name, message)`` (the import fails with that message). A request for a data
#: file of a forwarded package (``importlib.resources``) is named ``resource:PKG:PATH`` and
#: answered ``("data", request, bytes)``, ``("dir", request, ((entry, is_dir), ...))``,
#: ``("none", request)`` or ``("error", request, message)``.
Reply = tuple[Any, ...]
RESOURCE = "resource:"
