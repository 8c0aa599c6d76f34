"""The servers the transports section starts: ``rpycsvc serve`` processes, and TLS certificates.

:class:`ServeProcess` runs a server on 127.0.0.1 with the given ``RPYCSVC_*`` settings (an
authkey, TLS files); :func:`make_certs` makes the throwaway CA and server certificate with the
``openssl`` command, by the TLS recipe in docs/server.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from rpycsvc.cli.bench.report import BenchError


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key) for 127.0.0.1, by the TLS recipe in docs/server.md."""
    exts = {
        "ca": "basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n"
              "subjectKeyIdentifier = hash\n",
        "server": "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n"
                  "extendedKeyUsage = serverAuth\nsubjectKeyIdentifier = hash\n"
                  "authorityKeyIdentifier = keyid, issuer\n"
                  "subjectAltName = IP:127.0.0.1, DNS:localhost\n",
    }
    for name, ext in exts.items():
        (d / f"{name}.ext").write_text(ext)
        _openssl(d, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-subj", f"/CN=rpycsvc bench {name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr")
        signer = (["-signkey", "ca.key"] if name == "ca"
                  else ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"])
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", *signer, "-days", "2", "-sha256",
                 "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return d / "ca.pem", d / "server.pem", d / "server.key"


def _openssl(d: Path, *args: str) -> None:
    proc = subprocess.run(["openssl", *args], cwd=d, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"openssl {args[0]} failed: {proc.stderr.decode()[-500:]}")


class ServeProcess:
    """``rpycsvc serve --port 0`` on 127.0.0.1 with the given ``RPYCSVC_*`` settings (the
    bench's own ``RPYCSVC_*`` variables are not passed on); stops with our stdin pipe."""

    def __init__(self, settings: dict[str, str], workers: int, log: Path) -> None:
        from rpycsvc.client.local import read_address

        env = {k: v for k, v in os.environ.items() if not k.startswith("RPYCSVC_")}
        env.update(settings)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rpycsvc.cli", "serve", "--port", "0", "-q",
                 "--workers", str(workers), "--exit-on-stdin-eof"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                start_new_session=True)
        try:
            self.address = read_address(self.proc, 60)
        except Exception as exc:
            self.stop()
            raise BenchError(f"server did not start: {exc}: "
                             f"{log.read_text(errors='replace')[-800:]}") from exc
        self._drain = threading.Thread(target=self._discard, daemon=True,
                                       name=f"rpycsvc-bench-drain-{self.address}")
        self._drain.start()

    def _discard(self) -> None:
        assert self.proc.stdout is not None
        try:
            while os.read(self.proc.stdout.fileno(), 1 << 16):
                pass
        except OSError:
            pass

    def stop(self) -> None:
        for f in (self.proc.stdin,):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
