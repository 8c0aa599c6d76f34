"""``rpycsvc bench --transports``: the same task path measured over every transport.

The section starts its own servers on 127.0.0.1 (TLS and SSH need a setup of their own, so
``--transports`` takes no HOSTs or ``--local``): a plain TCP server, one with an authkey, one
with TLS (throwaway certificates made with the ``openssl`` CLI, as in docs/server.md's TLS
section), and a server deployed with ``rpycsvc.deploy`` over SSH to a private sshd it starts (when
``/usr/sbin/sshd`` is installed). Each gets 2 workers. Over each it measures sync
``compute(noop)`` p50, unbatched ``submit`` futures per second and 64 MiB of bytes up and
down, next to references measured in the same run, interleaved run by run:

- a cached raw RPyC call (``conn.root.ping``) on the plain TCP server;
- a raw TCP socket and a raw Python ``ssl`` socket, each served by a thread-mode task on the
  plain and the TLS server respectively, for 64 MiB;
- ``ssh HOST cat``: a 1-byte echo inside one open session (the channel's own round trip), and
  64 MiB through ``cat > /dev/null`` and ``head -c N /dev/zero``, timed inside the open
  session (the session's setup is not timed).

A missing ``openssl`` or ``sshd`` skips that transport with a note. A step that fails (a
transfer that breaks the connection, a call that hangs past its deadline) becomes a MISS row
whose label carries the error, plus a failed check (exit status 1), and the rest of the
section goes on; a transport whose step failed is left out of the steps after it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import ssl
import tempfile
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from rpycsvc.cli.bench.measuring import MB, median, run_steps, timed_echo, watchdog
from rpycsvc.cli.bench.raw_socket import RawPeer, SslPeer
from rpycsvc.cli.bench.report import BenchError, Figure, Report, run_alone, say
from rpycsvc.cli.bench.ssh_cat import SshEcho, ssh_cat_down, ssh_cat_up
from rpycsvc.cli.bench.tasks import digest, make_blob, noop
from rpycsvc.cli.bench.transport_servers import ServeProcess, make_certs

#: Transports in table order, with how they are named in labels.
NAMES = {"plain": "plain TCP", "authkey": "authkey", "tls": "TLS", "ssh": "SSH deploy"}


@dataclass
class TransportSizes:
    latency_samples: int = 1000  # per kind and run
    latency_runs: int = 3
    futures: int = 2000
    futures_runs: int = 3
    transfer_bytes: int = 64 << 20
    transfer_runs: int = 3
    step_timeout: float = 120.0  # seconds any one step (a chunk of calls, one transfer) may take

    @classmethod
    def quick(cls) -> TransportSizes:
        return cls(latency_samples=60, latency_runs=1, futures=100, futures_runs=1,
                   transfer_bytes=1 << 20, transfer_runs=1, step_timeout=60.0)


# -- the section ----------------------------------------------------------------------------------

class Transports:
    """Sets up every transport, measures, and adds the rows to ``report``."""

    def __init__(self, sizes: TransportSizes, report: Report, workers: int = 2) -> None:
        self.s = sizes
        self.r = report
        self.workers = workers
        self.clients: dict[str, Any] = {}
        self.failed: dict[str, str] = {}  # kind -> first error, for kinds dropped mid-run
        self.short: dict[str, str] = {}  # the same, shorter, for the row's label
        self._closers: list[Callable[[], None]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="rpycsvc-bench-transports-"))
        self.tls_files: tuple[Path, Path, Path] | None = None
        self.tls_ctx: ssl.SSLContext | None = None
        self.sshd: Any = None
        self.setup: dict[str, Any] = {}

    # -- setup ---------------------------------------------------------------------------------
    def start(self) -> None:
        import rpycsvc

        plain = self._serve("plain", {})
        self.clients["plain"] = rpycsvc.connect(plain.address, timeout=30)
        key = secrets.token_hex(16)
        srv = self._serve("authkey", {"RPYCSVC_AUTHKEY": key})
        self.clients["authkey"] = rpycsvc.connect(srv.address, authkey=key, timeout=30)
        if shutil.which("openssl") is None:
            self.r.notes.append("transports: TLS skipped: the openssl command is not on PATH "
                                "(it makes the throwaway certificates)")
        else:
            self._start_tls()
        from rpycsvc.cli.bench.sshd import unavailable

        why = unavailable()
        if why:
            self.r.notes.append(f"transports: SSH deployment skipped: {why}")
        else:
            self._start_ssh()
        for kind, c in self.clients.items():
            self.setup[kind] = c.address

    def _serve(self, kind: str, settings: dict[str, str]) -> ServeProcess:
        srv = ServeProcess(settings, self.workers, self.tmp / f"{kind}.log")
        self._closers.append(srv.stop)
        return srv

    def _start_tls(self) -> None:
        import rpycsvc

        try:
            ca, cert, key = self.tls_files = make_certs(self.tmp)
            srv = self._serve("tls", {"RPYCSVC_SSL_CERTFILE": str(cert),
                                      "RPYCSVC_SSL_KEYFILE": str(key)})
            ctx = ssl.create_default_context(cafile=str(ca))
            ctx.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
            self.tls_ctx = ctx
            self.clients["tls"] = rpycsvc.connect(srv.address, ssl=ctx, timeout=30)
        except Exception as exc:
            self._fail("tls", f"TLS setup failed: {type(exc).__name__}: {exc}")

    def _start_ssh(self) -> None:
        import rpycsvc
        from rpycsvc.cli.bench.sshd import PrivateSshd

        try:
            self.sshd = PrivateSshd().start()
            self._closers.append(self.sshd.stop)
            cluster = rpycsvc.deploy([self.sshd.alias], ssh_options=self.sshd.ssh_options(),
                                     workers=self.workers, timeout=60, require_all=True,
                                     output="discard")
            self._closers.insert(0, cluster.close)  # before sshd stops
            self.clients["ssh"] = cluster.clients[0]
        except Exception as exc:
            self._fail("ssh", f"SSH deployment failed: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        for kind, c in self.clients.items():
            if kind != "ssh":  # closed with its cluster
                try:
                    c.close()
                except Exception:
                    pass
        for closer in self._closers:
            try:
                closer()
            except Exception as exc:
                say(f"  transports: teardown: {type(exc).__name__}: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _fail(self, kind: str, why: str) -> None:
        if kind not in self.failed:
            self.failed[kind] = why
            self.short[kind] = why.split(": ", 1)[-1]  # the error, without the step's name
            self.r.check(f"transports.{kind}.ran", False, why)  # says it on stderr too

    def _step(self, kind: str, what: str, fn: Callable[[], Any],
              on_expire: Callable[[], None] | None = None) -> Any:
        """Run one step under the step deadline; a failure drops ``kind`` (None returned)."""
        if kind in self.failed:
            return None
        try:
            with watchdog(self.s.step_timeout, f"{what}", on_expire or (lambda: None)):
                return fn()
        except Exception as exc:
            self._fail(kind, f"{what}: {type(exc).__name__}: {exc}"[:400])
            return None

    # -- latency -------------------------------------------------------------------------------
    def latency(self) -> None:
        kinds: dict[str, Callable[[int], float]] = {}
        bad: list[str] = []

        for kind, c in self.clients.items():
            kinds[kind] = timed_echo(partial(c.compute, noop),
                                     f"compute(noop, {{}}) on {c.address}".format, bad)
        ping = self.clients["plain"].conn.root.ping  # cached: one round trip per call
        kinds["rpyc"] = timed_echo(ping, lambda i: f"ping({i})", bad)
        echo = None
        if "ssh" in self.clients:
            try:
                echo = SshEcho(self.sshd.ssh_argv(), self.s.step_timeout)
                kinds["ssh_echo"] = echo.ping
            except Exception as exc:
                self._fail("ssh_echo", f"ssh cat echo: {type(exc).__name__}: {exc}")
        closers: dict[str, Callable[[], None]] = {k: c.close for k, c in self.clients.items()}
        if echo is not None:
            closers["ssh_echo"] = echo.pipe.proc.kill
        closers["rpyc"] = self.clients["plain"].close
        p50s: dict[str, list[float]] = {k: [] for k in kinds}
        try:
            n = self.s.latency_samples
            for kind, fn in kinds.items():  # warm-up
                self._step(kind, f"{kind} latency warm-up",
                           partial(_calls, fn, range(min(100, n))), closers.get(kind))
            rounds = 10
            per = max(1, n // rounds)
            for _run in range(self.s.latency_runs):
                samples: dict[str, list[float]] = {k: [] for k in kinds}
                for r in range(rounds):  # interleaved: load drift hits every kind alike
                    for kind, fn in kinds.items():
                        got = self._step(kind, f"{kind} latency",
                                         partial(_calls, fn, range(r * per, (r + 1) * per)),
                                         closers.get(kind))
                        if got:
                            samples[kind].extend(got)
                for kind, xs in samples.items():
                    if xs and kind not in self.failed:
                        p50s[kind].append(median(xs) * 1e6)
        finally:
            if echo is not None:
                echo.close()
        self.r.check("transports.latency_results", not bad, "; ".join(bad[:3]))
        self.r.details["transports_latency_p50_us_per_run"] = p50s
        p50 = {k: median(v) for k, v in p50s.items() if v and k not in self.failed}
        runs = (f"median of {self.s.latency_runs} runs" if self.s.latency_runs > 1
                else "1 run")
        plain = p50.get("plain")
        if plain is not None and "rpyc" in p50:
            ratio = plain / p50["rpyc"]
            self.r.add(Figure("transports_plain_p50", f"plain TCP compute(noop) p50 ({runs})",
                              plain, "us", "cached raw rpyc call p50, same server", p50["rpyc"],
                              ratio, "<= 1.0x", ratio <= 1.0))
        else:
            self._missing("transports_plain_p50", "plain TCP compute(noop) p50", "us", "plain")
        if "authkey" in self.clients:
            self._vs_plain("transports_authkey_p50", "authkey compute(noop) p50", p50, "authkey",
                           None)
        if "tls" in self.clients or "tls" in self.failed:
            self._vs_plain("transports_tls_p50", "TLS compute(noop) p50", p50, "tls", 1.3)
        if "ssh" in self.clients or "ssh" in self.failed:
            label = "SSH deploy compute(noop) p50"
            if "ssh" in p50 and plain is not None and "ssh_echo" in p50:
                ref = plain + 1.2 * p50["ssh_echo"]
                self.r.add(Figure("transports_ssh_p50", label, p50["ssh"], "us",
                                  f"plain TCP p50 + 1.2 x ssh cat 1-byte echo "
                                  f"({p50['ssh_echo']:.0f} us)", ref, p50["ssh"] / ref,
                                  "<= 1.0x", p50["ssh"] <= ref))
            else:
                self._missing("transports_ssh_p50", label, "us", "ssh", "ssh_echo")

    def _vs_plain(self, key: str, label: str, p50: dict[str, float], kind: str,
                  target: float | None) -> None:
        if kind in p50 and "plain" in p50:
            ratio = p50[kind] / p50["plain"]
            self.r.add(Figure(key, label, p50[kind], "us", "plain TCP p50", p50["plain"], ratio,
                              f"<= {target}x" if target else "",
                              None if target is None else ratio <= target))
        else:
            self._missing(key, label, "us", kind, "plain")

    def _missing(self, key: str, label: str, unit: str, *kinds: str) -> None:
        """A row for a figure whose step failed: value 0, MISS, the error in the label."""
        why = next((self.short[k] for k in kinds if k in self.short), "not measured")
        if len(why) > 90:
            why = why[:87] + "..."
        self.r.add(Figure(key, f"{label}: FAILED ({why})", 0.0, unit, target="measured",
                          passed=False))

    # -- futures -------------------------------------------------------------------------------
    def futures(self) -> None:
        n = self.s.futures

        def burst(c: Any) -> float:
            t0 = time.perf_counter()
            futs = [c.submit(noop, i) for i in range(n)]
            deadline = time.monotonic() + self.s.step_timeout
            got = [f.result(max(0.1, deadline - time.monotonic())) for f in futs]
            dt = time.perf_counter() - t0
            self.r.check("transports.futures_results", got == list(range(n)),
                         f"on {c.address}")
            return n / dt

        rates: dict[str, list[float]] = {k: [] for k in self.clients}
        for kind, c in self.clients.items():  # warm-up
            self._step(kind, f"{kind} futures warm-up", partial(burst, c))
        for _ in range(self.s.futures_runs):
            for kind, c in self.clients.items():
                rate = self._step(kind, f"{kind} {n:,} futures", partial(burst, c))
                if rate:
                    rates[kind].append(rate)
        self.r.details["transports_futures_per_s"] = rates
        med = {k: median(v) for k, v in rates.items() if v and k not in self.failed}
        for kind in self.clients:
            label = f"{NAMES[kind]}: {n:,} submit(noop) futures, unbatched"
            key = f"transports_{kind}_futures"
            if kind not in med or "plain" not in med:
                self._missing(key, label, "tasks/s", kind, "plain")
            elif kind == "plain":
                self.r.add(Figure(key, label, med[kind], "tasks/s"))
            else:
                self.r.add(Figure(key, label, med[kind], "tasks/s", "plain TCP", med["plain"],
                                  med[kind] / med["plain"]))

    # -- 64 MiB transfers ----------------------------------------------------------------------
    def transfers(self) -> None:
        size = self.s.transfer_bytes
        data = os.urandom(size)
        crc = zlib.crc32(data)
        timeout = self.s.step_timeout
        plan: dict[str, Callable[[int], float]] = {}
        peers: list[RawPeer] = []

        def up(c: Any) -> Callable[[int], float]:
            def one(i: int) -> float:
                t0 = time.perf_counter()
                nbytes, got, spent = c.submit(digest, data).result(timeout)
                dt = time.perf_counter() - t0 - spent
                if (nbytes, got) != (size, crc):
                    raise BenchError(f"server saw {nbytes} bytes, CRC-32 {got:#x}; "
                                     f"sent {crc:#x}")
                return dt
            return one

        def down(c: Any) -> Callable[[int], float]:
            def one(i: int) -> float:
                t0 = time.perf_counter()
                obj, want, spent = c.submit(make_blob, "bytes", size, 100 + i).result(timeout)
                dt = time.perf_counter() - t0 - spent
                if len(obj) != size or zlib.crc32(obj) != want:
                    raise BenchError(f"received {len(obj)} bytes, CRC-32 mismatch")
                return dt
            return one

        closers: dict[str, Callable[[], None]] = {}
        for kind, c in self.clients.items():
            plan[f"{kind}_up"] = up(c)
            plan[f"{kind}_down"] = down(c)
            closers[f"{kind}_up"] = closers[f"{kind}_down"] = c.close
        raw = self._step("raw_up", "raw TCP socket setup", lambda: RawPeer(self.clients["plain"]))
        if raw is not None:
            peers.append(raw)
            plan["raw_up"] = lambda i: raw.upload(data, crc)
            plan["raw_down"] = lambda i: raw.download(size, 100 + i)
            closers["raw_up"] = closers["raw_down"] = raw.sock.close
            self.r.setup["transports_raw_tcp"] = raw.where
        if "tls" in self.clients and self.tls_files and self.tls_ctx:
            _, cert, certkey = self.tls_files
            sslp = self._step("ssl_up", "raw ssl socket setup",
                              partial(SslPeer, self.clients["tls"], self.tls_ctx, str(cert),
                                      str(certkey)))
            if sslp is not None:
                peers.append(sslp)
                plan["ssl_up"] = lambda i: sslp.upload(data, crc)
                plan["ssl_down"] = lambda i: sslp.download(size, 100 + i)
                closers["ssl_up"] = closers["ssl_down"] = sslp.sock.close
        if "ssh" in self.clients:
            argv = self.sshd.ssh_argv()
            plan["sshcat_up"] = lambda i: ssh_cat_up(argv, data, timeout)
            plan["sshcat_down"] = lambda i: ssh_cat_down(argv, size, timeout)
        secs: dict[str, list[float]] = {k: [] for k in plan}
        try:
            # Downloads first, then uploads, each phase with its references: a transfer that
            # breaks its connection (a large argument over SSH, today) then costs only the
            # rows after it, not the other direction's.
            for way in ("_down", "_up"):
                phase = {k: fn for k, fn in plan.items() if k.endswith(way)}
                for name, fn in phase.items():  # warm-up, full size
                    self._step(name, f"{name.replace('_', ' ')} {_size(size)} (warm-up)",
                               partial(fn, 0), closers.get(name))
                for i in range(self.s.transfer_runs):
                    for name, fn in phase.items():  # interleaved with the references
                        dt = self._step(name, f"{name.replace('_', ' ')} {_size(size)}",
                                        partial(fn, i + 1), closers.get(name))
                        if dt:
                            secs[name].append(dt)
        finally:
            for peer in peers:
                try:
                    peer.close()
                except Exception as exc:
                    say(f"  transports: closing a raw reference: {type(exc).__name__}: {exc}")
        rate = {k: size / MB / median(v) for k, v in secs.items() if v and k not in self.failed}
        self.r.details["transports_transfer_mb_s"] = {k: [size / MB / x for x in v]
                                                      for k, v in secs.items()}
        mib = _size(size)
        for kind in self.clients:
            for way, word in (("up", "sent"), ("down", "received")):
                name = f"{kind}_{way}"
                label = f"{NAMES[kind]}: {mib} bytes {word}"
                key = f"transports_{kind}_{way}"
                if name not in rate:
                    self._missing(key, label, "MB/s", name)
                    continue
                v = rate[name]
                if kind in ("plain", "authkey"):
                    ref = rate.get(f"raw_{way}")
                    if ref is None:
                        self._missing(key, label, "MB/s", f"raw_{way}")
                    elif kind == "plain":
                        self.r.add(Figure(key, label, v, "MB/s", f"raw TCP socket {way}", ref,
                                          v / ref, ">= 0.6x", v >= 0.6 * ref))
                    else:
                        self.r.add(Figure(key, label, v, "MB/s", f"raw TCP socket {way}", ref,
                                          v / ref))
                elif kind == "tls":
                    plain, raw_ssl = rate.get(f"plain_{way}"), rate.get(f"ssl_{way}")
                    if plain is None or raw_ssl is None:
                        self._missing(key, label, "MB/s", f"plain_{way}", f"ssl_{way}")
                        continue
                    floor = min(0.5 * plain, 0.6 * raw_ssl)
                    self.r.add(Figure(key, label, v, "MB/s",
                                      f"min(0.5 x plain TCP {plain:,.0f}, 0.6 x raw ssl socket "
                                      f"{raw_ssl:,.0f})", floor, v / floor, ">= 1.0x",
                                      v >= floor))
                else:
                    ref = rate.get(f"sshcat_{way}")
                    if ref is None:
                        self._missing(key, label, "MB/s", f"sshcat_{way}")
                        continue
                    what = "cat > /dev/null" if way == "up" else "head -c N /dev/zero"
                    self.r.add(Figure(key, label, v, "MB/s", f"ssh HOST '{what}'", ref, v / ref,
                                      ">= 0.6x", v >= 0.6 * ref))


def _calls(fn: Callable[[int], float], args: range) -> list[float]:
    return [fn(i) for i in args]


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def run_section(report: Report, sizes: TransportSizes) -> None:
    """Start the transports, measure them into ``report``, stop everything. Failures become
    failed checks and MISS rows; nothing is raised."""
    t = Transports(sizes, report)
    t0 = time.perf_counter()
    try:
        say("  transports: starting servers (plain TCP, authkey, TLS, SSH deployment)...")
        t.start()
        report.setup["transports"] = t.setup
        report.setup["transports_sizes"] = sizes.__dict__.copy()
        if "plain" not in t.clients:
            raise BenchError("the plain TCP server did not start")
        run_steps({"latency": t.latency, "futures": t.futures, "transfers": t.transfers}, report,
                  "transports")
    except Exception as exc:
        report.check("transports.setup", False, f"{type(exc).__name__}: {exc}")
    finally:
        t.close()
    report.details.setdefault("workload_s", {})["transports"] = round(time.perf_counter() - t0, 2)


def run_transports(args: argparse.Namespace) -> int:
    """``rpycsvc bench --transports``: this section alone, printed like the full bench."""
    quick = bool(getattr(args, "quick", False))

    def section(report: Report) -> None:
        run_section(report, TransportSizes.quick() if quick else TransportSizes())
        transports = report.setup.get("transports", {})
        report.setup["addresses"] = list(transports.values())
        report.setup["servers"] = "transports: " + (", ".join(
            f"{NAMES[k]} {a}" for k, a in transports.items()) or "none started")
        report.setup["workers"] = 2 * len(transports)
        report.setup["threads"] = 256 * len(transports)
        report.setup["raw_tcp_reference"] = report.setup.get("transports_raw_tcp", "-")

    return run_alone(args, "rpycsvc bench --transports",
                     "transports section: its own servers on 127.0.0.1 (plain TCP, authkey, TLS, "
                     "SSH deployment)", section)
