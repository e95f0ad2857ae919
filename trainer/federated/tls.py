"""TLS files for the SuperLink ``edgefleet fl start`` starts or talks to.

:func:`check_tls` reads and checks them before any process starts: every file readable, the
certificate and the CA bundle PEM certificates, the key an unencrypted PEM private key whose
public key is the certificate's. It raises :class:`TlsError` with one line. The CA bundle's
certificates (only the ``BEGIN/END CERTIFICATE`` blocks, so comments in the file do not reach
the run document) become the document's ``root_certificates``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TlsError", "TlsFiles", "check_tls", "read_ca"]

_CERT_RE = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")


class TlsError(ValueError):
    """A TLS file is missing, unreadable, not PEM, or the key is not the certificate's."""


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's certificate and key (``None`` for an external SuperLink) and the CA
    bundle that verifies that certificate."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"cannot read {what} {path}: {e.strerror or e}") from e


def read_ca(path: Path) -> str:
    """The PEM certificates of the CA bundle at ``path``, one per block, newline-terminated."""
    from cryptography import x509

    data = _read(path, "--tls-ca")
    blocks = _CERT_RE.findall(data.decode("ascii", errors="replace"))
    if not blocks:
        raise TlsError(f"--tls-ca {path} holds no PEM certificate")
    for block in blocks:
        try:
            x509.load_pem_x509_certificate(block.encode())
        except ValueError as e:
            raise TlsError(f"--tls-ca {path}: a certificate does not parse: {e}") from e
    return "".join(block + "\n" for block in blocks)


def check_tls(files: TlsFiles) -> str:
    """Check ``files`` (module docstring); returns the CA bundle's PEM (:func:`read_ca`)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    ca = read_ca(files.ca)
    if files.cert is None or files.key is None:
        return ca
    try:
        cert = x509.load_pem_x509_certificate(_read(files.cert, "--tls-cert"))
    except ValueError:
        raise TlsError(f"--tls-cert {files.cert} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(_read(files.key, "--tls-key"), password=None)
    except TypeError:
        raise TlsError(f"--tls-key {files.key} is encrypted: the SuperLink needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TlsError(f"--tls-key {files.key} is not a PEM private key") from e
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise TlsError(f"--tls-key {files.key} is not the key of --tls-cert {files.cert}")
    return ca

