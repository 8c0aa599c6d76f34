"""What a failed TLS handshake means, in words a user can act on.

OpenSSL's own text ("certificate verify failed: CA cert does not include key usage
extension") names the defect but not the fix. The commonest case since Python 3.13:
``ssl.create_default_context()`` turns on strict X.509 verification (``VERIFY_X509_STRICT``),
which refuses certificates from a quick ``openssl req -x509`` recipe that older Pythons
accepted. :func:`handshake_failure` keeps OpenSSL's reason and adds what to do, pointing to
the certificate recipe in docs/server.md.
"""

from __future__ import annotations

import ssl

#: The docs section with a certificate recipe that passes strict verification.
RECIPE = 'docs/server.md, section "TLS certificates"'

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) that have a specific fix.
_EXPIRED = {9: "is not valid yet", 10: "has expired"}
_UNTRUSTED = {2, 18, 19, 20, 21}  # no trusted issuer, self-signed leaf or chain
_NAME_MISMATCH = {62, 64}  # hostname, IP address


def is_strict(ctx: ssl.SSLContext | None) -> bool:
    """True if ``ctx`` verifies certificates strictly (``ssl.VERIFY_X509_STRICT``)."""
    return ctx is not None and bool(ctx.verify_flags & ssl.VERIFY_X509_STRICT)


def handshake_failure(exc: BaseException, address: str,
                      ctx: ssl.SSLContext | None = None) -> str:
    """The message for a TLS handshake with ``address`` that failed with ``exc``.

    It starts with ``TLS handshake with ADDRESS failed``, names OpenSSL's reason (and the
    verify code) and says what to change; ``ctx`` is the client's context, if known.
    """
    head = f"TLS handshake with {address} failed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        what = exc.verify_message or str(exc)
        reason = f"{what} (ssl reason {exc.reason}, verify code {code})"
        if code in _NAME_MISMATCH:
            fix = (f"the server's certificate does not name {address.rsplit(':', 1)[0]!r}: "
                   "its subjectAltName must list the name or IP address you connect to "
                   "(or pass server_hostname= the name it has)")
        elif code in _UNTRUSTED:
            fix = ("the server's certificate is not signed by a CA this client trusts: pass "
                   "ssl=ssl.create_default_context(cafile='ca.pem') with the CA that signed it")
        elif code in _EXPIRED:
            fix = f"a certificate in the server's chain {_EXPIRED[code]}: re-issue it"
        else:
            strict = ("strict X.509 verification (ssl.VERIFY_X509_STRICT, on by default from "
                      "Python 3.13) is on here and " if is_strict(ctx) else "")
            fix = (f"{strict}the server's certificate chain lacks something a real CA sets "
                   "(basicConstraints and keyUsage on the CA, subjectAltName and key "
                   "identifiers on the server's certificate)")
        return f"{head}: {reason}. {fix}. See {RECIPE} for certificates that pass."
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or type(exc).__name__
        text = f"{head}: {exc.strerror or exc} (ssl reason {reason})"
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
            return f"{text}. Does the server at {address} speak TLS (rpycsvc serve --ssl-*)?"
        if "ALERT" in reason:
            return (f"{text}. The server refused the handshake: if it requires client "
                    "certificates (--ssl-cafile), pass an ssl context that loads one its CA signed "
                    f"(ctx.load_cert_chain('client.pem', 'client.key')). See {RECIPE}.")
        return f"{text}. See {RECIPE}."
    return f"{head}: {exc}"
