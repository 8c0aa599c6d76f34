"""``rpycsvc bench``: measure a live cluster against the performance targets, honestly.

Each figure is printed next to a reference measured in the same run on the same servers
(a raw RPyC call, a raw TCP socket, a serial run, a local thread pool...), with the ratio
and PASS/MISS against its target. Every workload checks its results (sums, lengths,
CRC-32s computed on both ends); a wrong result fails the run, a slow one only says MISS.

This module is the command (its options, and :func:`run`, which loads the rest only when it
runs, so ``rpycsvc bench --help`` imports nothing else of the bench). The package, from the
bottom up:

- ``report``: :class:`~rpycsvc.cli.bench.report.Figure` rows and checks in a ``Report``; the
  table or JSON and the exit status.
- ``measuring``: medians, RSS and CPU of processes, the watchdog, the step runner.
- ``tasks``: the functions the servers run (module level, so they pickle by reference).
- ``raw_socket``: the raw TCP and ssl socket references, both ends.
- ``workload``: what a workload of the main bench gets (``BenchRun``, ``Sizes``).
- one module per workload, named as in the report: ``memory_idle``, ``latency``,
  ``map_and_memory``, ``sleeps``, ``cpu``, ``stdout``, ``transfers``; ``suite`` runs them in
  turn on the cluster it starts or is given.
- ``transports``: the ``--transports`` section, with servers of its own
  (``transport_servers``: ``rpycsvc serve`` processes and TLS certificates; ``sshd``: the
  private sshd its SSH deployment logs in to; ``ssh_cat``: the ``ssh HOST cat`` reference).
- ``asyncio_section``: the ``--asyncio`` section: awaited submits against sync ones on the
  same servers, and the event loop's lag meanwhile.

Adding a workload to the main run (it measures the cluster the bench was given): a module
here, named as the workload, with ``measure(bench: BenchRun) -> None`` that adds its
``Figure`` rows and checks to ``bench.report`` (a result it cannot trust is a failed check;
an exception fails the check ``NAME.ran`` and the next workload still runs); one line in
``suite.WORKLOADS``; its sizes, full and ``--quick``, in ``workload.Sizes``; its figure keys
and checks in tests/test_bench.py's ``FIGURES`` and ``CHECKS``. The run itself is
synchronous: an asyncio workload's ``measure`` runs its coroutine with ``asyncio.run``.

Adding a section with servers or a setup of its own (like ``--transports``): a module here
with ``run_section(report, ...)`` that starts what it needs, measures into the report (its
steps through ``measuring.run_steps(steps, report, "NAME")``), stops everything and raises
nothing; an option in :func:`add_arguments` and a branch in :func:`run` that imports the
module and calls ``report.run_alone(args, title, servers, section)``, as ``--transports``
does (``transports.run_transports``).
"""

from __future__ import annotations

import argparse

from rpycsvc.errors import ConfigError

DESCRIPTION = """\
Measure a live cluster: the given servers (HOST[:PORT] ...), or N servers started here
with --local N (default 2) and stopped at the end. Prints a table of figures, each next
to a reference measured in the same run, their ratio, the target and PASS/MISS:

  compute latency     client.compute(noop) p50/p99 vs a cached raw RPyC call on the same
                      server, and vs a 1-byte TCP echo served by a thread-mode task there
  map                 tasks/s over 100,000 no-ops vs a local ProcessPoolExecutor at its
                      best chunksize, time to the first result, client RSS
  200 x sleep(10 ms)  thread mode over every server, as a map and as 200 unbatched
                      submits, vs a local 200-thread pool doing the same
  CPU speedup         16 pure-Python tasks of ~50 ms vs the same run serially here
  transfers           64 MiB numpy array and bytes, up and down, vs a raw TCP socket
  stdout              100,000 printed lines streamed vs discarded
  server memory       idle RSS; RSS after 100,000 and 200,000 map tasks
  transports          only with --transports (servers of its own; ~2 min): compute p50,
                      futures/s, 64 MiB up/down over plain TCP, authkey, TLS, SSH deployment
                      vs raw RPyC, raw TCP and ssl sockets and "ssh HOST cat"

Every workload verifies its results; a wrong result exits 1. Targets missed only show
MISS (add --fail-on-miss to exit 3 then). Numbers on a busy machine are noisy: compare
ratios, not absolutes. MB = 10^6 bytes."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hosts", nargs="*", metavar="HOST",
                   help="servers to measure (host[:port]); default: --local 2")
    p.add_argument("--local", type=int, default=None, metavar="N",
                   help="start N servers on 127.0.0.1, measure them, stop them (default: 2 "
                   "when no HOST is given)")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON instead of the table (default: off)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (2,000 tasks, 4 MiB...): same code paths, for tests "
                   "(default: off, full sizes)")
    p.add_argument("--fail-on-miss", action="store_true",
                   help="exit 3 when a target is missed (default: off, a miss only shows "
                   "MISS in the table)")
    p.add_argument("--transports", action="store_true",
                   help="only the transports section, on servers it starts itself (plain TCP, "
                   "authkey, TLS, SSH deployment to a private sshd); HOSTs and --local are "
                   "not used (default: off)")
    p.add_argument("--asyncio", action="store_true",
                   help="only the asyncio section: awaited submits vs sync submits (throughput, "
                   "p50) and the event loop's lag, on HOSTs or --local N (default: off)")
    p.add_argument("--authkey", default=None,
                   help="the servers' shared secret, for HOSTs that need one (default: "
                   "RPYCSVC_AUTHKEY, or none; prefer the variable: command lines are "
                   "visible to other users)")



def run(args: argparse.Namespace) -> int:
    """Run the bench the options ask for; the exit status of :func:`report.finish`.

    The modules that measure are imported here, not at the top: ``rpycsvc bench --help``
    builds the parser from this module alone."""
    if args.hosts and args.local:
        raise ConfigError("give HOSTs or --local N, not both")
    if getattr(args, "asyncio", False):
        from rpycsvc.cli.bench.asyncio_section import run_asyncio

        return run_asyncio(args)
    if getattr(args, "transports", False):
        from rpycsvc.cli.bench.transports import run_transports

        if args.hosts or args.local:
            raise ConfigError("--transports starts servers of its own: leave out HOSTs and --local")

        return run_transports(args)
    from rpycsvc.cli.bench.suite import run_suite

    return run_suite(args)
