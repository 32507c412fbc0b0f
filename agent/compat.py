"""What differs between the distributions' cryptography and pyOpenSSL (Debian 12: 38.0 / 23.0,
Debian 13: 43.0 / 25.0), in one place, so that the rest of the code reads the same on both."""

from __future__ import annotations

import datetime
from typing import Any

import OpenSSL
from cryptography import x509
from OpenSSL import crypto

# pyOpenSSL 24.3 takes cryptography certificates and deprecates its own X509; 23.0 takes only X509.
_TAKES_CRYPTOGRAPHY_CERTIFICATES = tuple(int(n) for n in OpenSSL.__version__.split(".")[:2]) >= (24, 3)


def pyopenssl_certificate(cert: x509.Certificate) -> Any:
    """What ``Context.use_certificate``/``add_extra_chain_cert`` take, without a deprecation warning."""
    return cert if _TAKES_CRYPTOGRAPHY_CERTIFICATES else crypto.X509.from_cryptography(cert)


def not_valid_after(cert: x509.Certificate) -> datetime.datetime:
    """The end of validity, aware (UTC); cryptography 42 deprecates the naive ``not_valid_after``."""
    aware = getattr(cert, "not_valid_after_utc", None)
    if isinstance(aware, datetime.datetime):
        return aware
    return cert.not_valid_after.replace(tzinfo=datetime.UTC)
