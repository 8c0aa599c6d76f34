"""The lazy top level: ``import rpycsvc`` costs what a client needs (issue 16).

Every public name stays importable from ``rpycsvc`` but is loaded on first use (PEP 562), and
the dependency direction holds: a client script, even one that connects and runs tasks,
imports no server-side module and no SSH-deployment module; ``rpycsvc --help`` imports no
subcommand module. What a fresh interpreter has imported is the public fact checked: each
check runs in its own ``python`` process (this test process has imported everything already).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import rpycsvc
from tests.support.servers import REPO, ServerProcess
from tests.test_registry import RegistryProcess, register_args, wait_for

WAIT = 120.0
#: the folders of the package by role (the package's own layout, issue 16)
SERVER_FOLDER, DEPLOYMENT_FOLDER, CLI_FOLDER = "rpycsvc.server", "rpycsvc.deployment", "rpycsvc.cli"


def under(modules: set[str], *folders: str) -> set[str]:
    """The modules of ``modules`` that live in one of ``folders`` (dotted package names)."""
    return {m for m in modules for f in folders if m == f or m.startswith(f + ".")}


#: the modules of the ``rpycsvc`` subcommands other than serve (which lives in rpycsvc.cli.main)
SUBCOMMAND_MODULES = {"rpycsvc.cli.demo", "rpycsvc.cli.bench", "rpycsvc.cli.status",
                      "rpycsvc.cli.top", "rpycsvc.cli.repl", "rpycsvc.server.registry",
                      "rpycsvc.deployment.command"}
#: what the subcommands need that a plain ``rpycsvc --help`` must not load either
HEAVY = {"rpycsvc.server.server", "rpycsvc.deployment.bootstrap", "rpycsvc.deployment.launcher",
         "rpycsvc.client.remote_session"}

#: prints, as its last line, the rpycsvc modules the interpreter has imported so far
REPORT = ("import json as _json, sys as _sys\n"
          "print(_json.dumps(sorted(m for m in _sys.modules if m.split('.')[0] == 'rpycsvc')))\n")


def fresh_python(code: str, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run ``code`` (dedented) in a new interpreter, ``args`` as ``sys.argv[1:]`` and ``env``
    added to the environment; return the JSON value its last line of output holds."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                         capture_output=True, text=True, timeout=WAIT, cwd=str(REPO),
                         stdin=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def loaded_after(code: str, *args: str) -> set[str]:
    """The rpycsvc modules a new interpreter has imported once it has run ``code``."""
    return set(fresh_python(textwrap.dedent(code) + REPORT, *args))


def imported_by_cli(*argv: str) -> set[str]:
    """The rpycsvc modules ``python -m rpycsvc.cli ARGV...`` (which ``rpycsvc`` runs) has
    imported when it exits: the command runs in a new interpreter, then the list is printed."""
    return loaded_after("""
        import runpy, sys
        sys.argv = ["rpycsvc", *sys.argv[1:]]
        try:
            runpy.run_module("rpycsvc.cli", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        print()  # the list goes on a line of its own after the help
    """, *argv)


def test_every_public_name_is_lazy_listed_by_dir_and_resolves() -> None:
    """``__all__`` is exactly the names loaded on demand: none is in the module right after
    ``import rpycsvc``, ``dir()`` lists each, and each then resolves and stays."""
    facts = fresh_python("""
        import json
        import rpycsvc
        loaded = set(vars(rpycsvc))
        listed = dir(rpycsvc)
        resolved = {n: getattr(rpycsvc, n) is not None and n in vars(rpycsvc)
                    for n in rpycsvc.__all__}
        print(json.dumps({"all": rpycsvc.__all__, "dir": listed,
                          "lazy": sorted(set(listed) - loaded), "resolved": resolved}))
    """)
    assert facts["lazy"] == sorted(facts["all"]), "__all__ and the names loaded lazily differ"
    assert set(facts["all"]) <= set(facts["dir"])
    assert facts["dir"] == sorted(facts["dir"])
    unresolved = [n for n, ok in facts["resolved"].items() if not ok]
    assert not unresolved, unresolved


def test_import_rpycsvc_loads_no_server_deployment_or_cli_module() -> None:
    loaded = loaded_after("import rpycsvc\n")
    assert "rpycsvc" in loaded
    assert not under(loaded, SERVER_FOLDER, DEPLOYMENT_FOLDER, CLI_FOLDER), sorted(loaded)


def test_a_client_script_loads_no_server_or_deployment_module(
        server_process: type[ServerProcess]) -> None:
    """Touching ``connect`` and ``Cluster``, connecting, and running tasks (with a timeout,
    checked by the client) through both imports only the client side."""
    srv = server_process("--workers", "1")
    loaded = loaded_after("""
        import sys
        import rpycsvc
        rpycsvc.connect, rpycsvc.Cluster, rpycsvc.ClusterExecutor, rpycsvc.TaskFuture
        rpycsvc.RpycsvcError, rpycsvc.TaskTimeoutError, rpycsvc.__version__
        address = sys.argv[1]
        with rpycsvc.connect(address) as client:
            assert client.options(timeout=60).compute(pow, 2, 10) == 1024
        with rpycsvc.Cluster([address]) as cluster:
            assert cluster.options(timeout=60).submit(abs, -3).result(timeout=60) == 3
    """, srv.address)
    # it did load the client side
    assert {"rpycsvc.client.connection", "rpycsvc.client.cluster"} <= loaded
    assert not under(loaded, SERVER_FOLDER, DEPLOYMENT_FOLDER, CLI_FOLDER), sorted(loaded)


def test_cluster_discover_loads_no_server_module(server_process: type[ServerProcess]) -> None:
    """Finding servers through a registry is client-side: ``Cluster.discover`` (and the
    cluster it returns, running a task) loads the discovery code, not the registry server's
    module or the server's configuration."""
    registry = RegistryProcess("--mode", "TCP")
    try:
        srv = server_process(*register_args(registry))
        wait_for(registry.port, {srv.address})
        loaded = loaded_after("""
            import sys
            import rpycsvc
            with rpycsvc.Cluster.discover(registry_port=int(sys.argv[1]), timeout=30) as c:
                assert c.addresses == [sys.argv[2]], c.addresses
                assert c.options(timeout=60).submit(abs, -3).result(timeout=60) == 3
        """, str(registry.port), srv.address)
    finally:
        registry.stop()
    assert "rpycsvc.client.discovery" in loaded
    assert not under(loaded, SERVER_FOLDER, DEPLOYMENT_FOLDER, CLI_FOLDER), sorted(loaded)


def test_cluster_deployed_loads_no_deployment_module() -> None:
    """``Cluster.deployed()`` outside ``rpycsvc deploy --run`` says how to get one, without
    loading the SSH deployment code (the list of deployed clusters is client state)."""
    facts = fresh_python("""
        import json, sys
        import rpycsvc
        try:
            rpycsvc.Cluster.deployed()
        except rpycsvc.ConfigError as exc:
            error = str(exc)
        print(json.dumps({"error": error, "loaded": sorted(
            m for m in sys.modules if m.split(".")[0] == "rpycsvc")}))
    """)
    assert "rpycsvc deploy HOST... --run SCRIPT" in facts["error"]
    assert not under(set(facts["loaded"]), SERVER_FOLDER, DEPLOYMENT_FOLDER), facts["loaded"]


def test_top_level_help_imports_no_subcommand_module() -> None:
    loaded = imported_by_cli("--help")
    assert not loaded & (SUBCOMMAND_MODULES | HEAVY), sorted(loaded)


def test_a_subcommand_imports_its_module_only() -> None:
    """``rpycsvc status --help`` loads status (it builds status's parser), not the modules of
    the commands it does not run (nor the registry server: ``--discover`` is client-side);
    likewise ``top --help``; ``serve --help`` loads no server."""
    loaded = imported_by_cli("status", "--help")
    assert "rpycsvc.cli.status" in loaded
    others = SUBCOMMAND_MODULES - {"rpycsvc.cli.status"}  # --discover is rpycsvc.client.discovery's
    assert not loaded & (others | HEAVY), sorted(loaded)
    loaded = imported_by_cli("top", "--help")
    # top probes as status does
    others = SUBCOMMAND_MODULES - {"rpycsvc.cli.top", "rpycsvc.cli.status"}
    assert not loaded & (others | HEAVY), sorted(loaded)
    loaded = imported_by_cli("serve", "--help")
    assert not loaded & (SUBCOMMAND_MODULES | HEAVY), sorted(loaded)


def test_unknown_attribute_raises_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="'no_such_name'"):
        rpycsvc.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    assert not hasattr(rpycsvc, "Sever")
    with pytest.raises(ImportError, match="no_such_name"):
        from rpycsvc import no_such_name  # type: ignore[attr-defined]  # noqa: F401


def test_load_ext_rpycsvc_registers_the_notebook_magics(tmp_path: Path) -> None:
    """``%load_ext rpycsvc`` (the package, not only ``rpycsvc.integrations.ipython``) works:
    the top level's hook loads the extension, whose magics IPython then knows."""
    pytest.importorskip("IPython")
    magics = fresh_python("""
        import json
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "rpycsvc")
        known = shell.magics_manager.magics
        print(json.dumps({kind: sorted(known[kind]) for kind in ("line", "cell")}))
    """, env={"IPYTHONDIR": str(tmp_path)})
    assert "rpycsvc" in magics["line"]
    assert {"remote", "broadcast"} <= set(magics["cell"])
