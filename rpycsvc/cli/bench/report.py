"""The bench's report: figures and checks, the table or JSON it prints, and the exit status.

Every workload and section adds :class:`Figure` rows and named checks to one :class:`Report`;
:func:`finish` prints it (a table, or JSON with ``--json``) and turns it into the exit status:
1 when a result was wrong or a workload did not run, 3 for a missed target with
``--fail-on-miss``. :func:`run_alone` runs a section with servers of its own (``--transports``)
and reports it the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import rpyc


@dataclass
class Figure:
    key: str
    label: str
    value: float
    unit: str
    ref_label: str = ""
    ref_value: float | None = None
    ratio: float | None = None  # value / ref_value
    target: str = ""  # e.g. "<= 1.3x", ">= 50000/s"
    passed: bool | None = None  # None: no target
    ref_unit: str = ""  # when not the value's unit


@dataclass
class Report:
    setup: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        return fig

    def check(self, name: str, ok: bool, why: str = "") -> None:
        self.checks[name] = self.checks.get(name, True) and bool(ok)  # repeated: all must pass
        if not ok:
            self.errors.append(f"check failed: {name}" + (f": {why}" if why else ""))
            say(f"  CHECK FAILED: {name} {why}")


class BenchError(Exception):
    """A workload produced a wrong result or could not run."""


def say(text: str) -> None:
    """Progress and failures on stderr: stdout carries only the table (or the JSON)."""
    print(text, file=sys.stderr, flush=True)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine_setup() -> dict[str, Any]:
    """What the report's first line says of this machine: Python, RPyC, cores."""
    return {"python": platform.python_version(),
            "rpyc": rpyc.__version__ if hasattr(rpyc, "__version__") else "?",
            "cores": os.cpu_count() or 1}


# -- output ------------------------------------------------------------------------------------

def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit in ("tasks/s",):
        return f"{value:,.0f}/s"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    if abs(value) >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.2f} {unit}"


def render(report: Report) -> str:
    s = report.setup
    lines = [
        f"rpycsvc bench: {s['servers']} | {s['workers']} process workers, "
        f"{s['threads']} thread slots | python {s['python']}, rpyc {s['rpyc']}, "
        f"{s['cores']} cores | {'quick' if s['quick'] else 'full'} sizes",
        f"load average at start {s['load_start']}, at end {s.get('load_end', '?')}; "
        f"took {s.get('elapsed_s', 0):.0f} s",
        f"raw TCP reference: served by {s.get('raw_tcp_reference', '?')}",
        "",
    ]
    rows = [("figure", "value", "reference", "ratio", "target", "result")]
    for f in report.figures:
        ref = f"{f.ref_label}: {_fmt(f.ref_value, f.ref_unit or f.unit)}" if f.ref_label else "-"
        result = "-" if f.passed is None else ("PASS" if f.passed else "MISS")
        rows.append((f.label, _fmt(f.value, f.unit), ref,
                     "-" if f.ratio is None else f"{f.ratio:.2f}x", f.target or "-", result))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    failed = [k for k, ok in report.checks.items() if not ok]
    lines.append("")
    lines.append(f"correctness: {len(report.checks) - len(failed)} of {len(report.checks)} "
                 "checks passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    for err in report.errors:
        lines.append(f"ERROR: {err}")
    for note in report.notes:
        lines.append(textwrap.fill(f"note: {note}", 100, subsequent_indent="      "))
    misses = [f.key for f in report.figures if f.passed is False]
    lines.append(f"targets: {sum(f.passed is True for f in report.figures)} PASS, "
                 f"{len(misses)} MISS" + (f" ({', '.join(misses)})" if misses else ""))
    return "\n".join(lines)



def finish(report: Report, args: argparse.Namespace) -> int:
    """Print the table (or JSON) and return the exit status."""
    ok = all(report.checks.values())
    if args.json:
        doc = {"ok": ok, "setup": report.setup,
               "figures": {f.key: asdict(f) for f in report.figures},
               "checks": report.checks, "errors": report.errors, "notes": report.notes,
               "details": report.details}
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(render(report))
    if not ok:
        say("rpycsvc bench: FAILED: some results were wrong or a workload did not run "
            "(see the errors above); the figures of those workloads mean nothing")
        return 1
    if args.fail_on_miss and any(f.passed is False for f in report.figures):
        return 3
    return 0



def run_alone(args: argparse.Namespace, title: str, servers: str,
              section: Callable[[Report], None]) -> int:
    """Run one section that starts servers of its own (``--transports``) as the whole bench:
    ``section(report)`` measures into the report (and fills in the setup's servers, addresses,
    workers and threads, which it alone knows); the report is then printed like the full bench's.
    """
    report = Report()
    t0 = time.perf_counter()
    report.setup = {"servers": servers, "addresses": [], "workers": 0, "threads": 0,
                    **machine_setup(), "quick": bool(getattr(args, "quick", False)),
                    "load_start": load_average()}
    say(title)
    section(report)
    report.setup["load_end"] = load_average()
    report.setup["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return finish(report, args)
