"""What a workload of the main bench is given: the cluster, the sizes, the report, earlier figures.

Each workload module (``latency``, ``cpu``, ...) has a function ``measure(bench: BenchRun)``;
the run (:mod:`rpycsvc.cli.bench.suite`) makes one :class:`BenchRun` and passes it to each in
turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rpycsvc.cli.bench.report import BenchError, Report


@dataclass
class Sizes:
    latency_samples: int = 3000
    map_tasks: int = 100_000
    rpyc_pipelined: int = 5000
    sleep_runs: int = 5
    cpu_tasks: int = 16
    cpu_seconds: float = 0.05
    cpu_runs: int = 3
    transfer_bytes: int = 64 << 20
    transfer_runs: int = 3
    stdout_lines: int = 100_000
    stdout_runs: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(latency_samples=300, map_tasks=2000, rpyc_pipelined=500, sleep_runs=2,
                   cpu_tasks=8, cpu_seconds=0.02, cpu_runs=1, transfer_bytes=4 << 20,
                   transfer_runs=2, stdout_lines=5000, stdout_runs=2)


class BenchRun:
    """One run of the main bench over ``cluster``: what every workload reads, and the figures
    that a workload measured for a later one to compare with (set in the order of
    :data:`rpycsvc.cli.bench.suite.WORKLOADS`)."""

    def __init__(self, cluster: Any, sizes: Sizes, report: Report, local: bool) -> None:
        self.cluster = cluster
        self.sizes = sizes
        self.report = report
        self.local = local  # the servers were started here (so they share this host's cores)
        self.client = cluster.clients[0]
        self.compute_p50 = 0.0  # us, by latency; map's time to first result is compared with it
        self.idle_tree = 0  # bytes, by memory_idle; the tree RSS after transfers is compared

    def server_stats(self) -> list[dict[str, Any]]:
        """``stats()`` of every server (with its address), or BenchError if one did not answer."""
        out = []
        for c in self.cluster.clients:
            s = c.stats()
            s.setdefault("address", c.address)
            out.append(s)
        if len(out) != len(self.cluster):
            raise BenchError(f"only {len(out)} of {len(self.cluster)} servers answered stats()")
        return out

