"""The main bench: start or connect to the servers, run every workload on them in turn, print.

:data:`WORKLOADS` lists the workloads in the order they run (a later one may compare with a
figure an earlier one left on the :class:`~rpycsvc.cli.bench.workload.BenchRun`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from functools import partial
from typing import Any, Callable

from rpycsvc.cli.bench import (
    cpu,
    latency,
    map_and_memory,
    memory_idle,
    sleeps,
    stdout,
    transfers,
)
from rpycsvc.cli.bench.measuring import run_steps
from rpycsvc.cli.bench.report import Report, finish, load_average, machine_setup, say
from rpycsvc.cli.bench.workload import BenchRun, Sizes
from rpycsvc.client.cluster import Cluster
from rpycsvc.errors import ConfigError

#: name (in ``workload_s`` and the check ``NAME.ran``) -> the workload, in the order they run
WORKLOADS: dict[str, Callable[[BenchRun], None]] = {
    "memory_idle": memory_idle.measure,
    "latency": latency.measure,
    "map_and_memory": map_and_memory.measure,
    "sleeps": sleeps.measure,
    "cpu": cpu.measure,
    "stdout": stdout.measure,
    "transfers": transfers.measure,
}


def run_suite(args: argparse.Namespace) -> int:
    """``rpycsvc bench [HOST...] [--local N]``: every workload, then the table (or JSON)."""
    local = not args.hosts
    n_local = 2 if args.local is None else args.local
    if local and n_local < 1:
        raise ConfigError(f"--local needs N >= 1; got {n_local!r}")
    sizes = Sizes.quick() if args.quick else Sizes()
    report = Report()
    t_start = time.perf_counter()
    kw: dict[str, Any] = {"timeout": 30.0}
    if args.authkey:
        kw["authkey"] = args.authkey
    say(f"rpycsvc bench: starting {n_local} local servers" if local
        else f"rpycsvc bench: connecting to {len(args.hosts)} servers")
    cluster = Cluster.local(n_local, **kw) if local else Cluster(args.hosts, require_all=True, **kw)
    try:
        report.setup = {
            "servers": (f"{len(cluster)} local servers" if local else f"{len(cluster)} servers")
            + f" ({', '.join(cluster.addresses)})",
            "addresses": cluster.addresses,
            "workers": cluster.total_workers,
            "threads": cluster.total_threads,
            **machine_setup(),
            "quick": bool(args.quick),
            "sizes": asdict(sizes),
            "load_start": load_average(),
        }
        bench = BenchRun(cluster, sizes, report, local)
        run_steps({name: partial(measure, bench) for name, measure in WORKLOADS.items()}, report)
    finally:
        cluster.close()
    report.setup["load_end"] = load_average()
    report.setup["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return finish(report, args)

