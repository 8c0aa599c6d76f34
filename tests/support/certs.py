"""Throwaway certificates for the TLS tests, made as a real CA makes them (openssl CLI).

The CA has a critical ``basicConstraints CA:TRUE``, a critical ``keyUsage`` of
``keyCertSign, cRLSign`` and a subject key identifier; leaves have ``CA:FALSE``, a
``keyUsage``, an ``extendedKeyUsage`` (server or client), a subjectAltName (the server's) and
both key identifiers. So they pass OpenSSL's strict verification (``ssl.VERIFY_X509_STRICT``),
which Python 3.13's default contexts turn on. Every extension is written out in an extension
file, so the result doesn't depend on the local ``openssl.cnf``. EC P-256 keys: milliseconds
each, where RSA keys take seconds.

``make_weak_chain`` makes what a quick ``openssl req -x509`` recipe gives: a CA without
``keyUsage``, which strict verification refuses ("CA cert does not include key usage
extension").
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

#: A CA as RFC 5280 wants it (and strict verification checks).
CA_EXTENSIONS = (
    "basicConstraints = critical, CA:TRUE",
    "keyUsage = critical, keyCertSign, cRLSign",
    "subjectKeyIdentifier = hash",
)
#: The CA of a quick recipe: no keyUsage.
WEAK_CA_EXTENSIONS = (
    "basicConstraints = critical, CA:TRUE",
    "subjectKeyIdentifier = hash",
)
SERVER_SAN = "IP:127.0.0.1, DNS:localhost"


def _leaf_extensions(usage: str, san: str | None) -> tuple[str, ...]:
    return (
        "basicConstraints = critical, CA:FALSE",
        "keyUsage = critical, digitalSignature",
        f"extendedKeyUsage = {usage}",
        "subjectKeyIdentifier = hash",
        "authorityKeyIdentifier = keyid, issuer",
        *([f"subjectAltName = {san}"] if san else []),
    )


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _run(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.decode()[-2000:]}")


def make_cert(d: Path, name: str, extensions: tuple[str, ...], issuer: str | None = None) -> Path:
    """``name.pem`` and ``name.key`` in ``d``, signed by ``issuer`` (its ``.pem``/``.key`` in
    ``d``), or self-signed without one; ``extensions`` are extension-file lines."""
    _run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", f"/CN=rpycsvc test {name}", "-keyout", f"{name}.key", "-out", f"{name}.csr",
         cwd=d)
    (d / f"{name}.ext").write_text("".join(f"{line}\n" for line in extensions))
    signer = (["-signkey", f"{name}.key"] if issuer is None else
              ["-CA", f"{issuer}.pem", "-CAkey", f"{issuer}.key", "-CAcreateserial"])
    _run("x509", "-req", "-in", f"{name}.csr", *signer, "-days", "2", "-sha256",
         "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
    return d / f"{name}.pem"


def make_certs(d: Path) -> Certs:
    make_cert(d, "ca", CA_EXTENSIONS)
    make_cert(d, "other", CA_EXTENSIONS)
    make_cert(d, "server", _leaf_extensions("serverAuth", SERVER_SAN), issuer="ca")
    make_cert(d, "client", _leaf_extensions("clientAuth", None), issuer="ca")
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
                 d / "client.key", d / "other.pem")


def make_weak_chain(d: Path) -> tuple[Path, Path, Path]:
    """``(ca, server_cert, server_key)`` where the CA lacks keyUsage (and is otherwise fine)."""
    make_cert(d, "weakca", WEAK_CA_EXTENSIONS)
    make_cert(d, "weakserver", _leaf_extensions("serverAuth", SERVER_SAN), issuer="weakca")
    return d / "weakca.pem", d / "weakserver.pem", d / "weakserver.key"
