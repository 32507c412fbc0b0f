"""What differs between the distributions' cryptography and pyOpenSSL (Debian 12: 38.0 / 23.0,
Debian 13: 43.0 / 25.0), in one place, so that the rest of the code reads the same on both."""

from __future__ import annotations

import datetime
from typing import Any

import OpenSSL
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import crypto

# pyOpenSSL 24.3 takes cryptography certificates and keys and deprecates its own X509 and PKey;
# 23.0 takes only its own.
_TAKES_CRYPTOGRAPHY_OBJECTS = tuple(int(n) for n in OpenSSL.__version__.split(".")[:2]) >= (24, 3)


def pyopenssl_certificate(cert: x509.Certificate) -> Any:
    """What ``Context.use_certificate``/``add_extra_chain_cert`` take, without a deprecation warning."""
    return cert if _TAKES_CRYPTOGRAPHY_OBJECTS else crypto.X509.from_cryptography(cert)


def pyopenssl_private_key(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> Any:
    """What ``Context.use_privatekey`` takes for an in-memory key, without a deprecation warning."""
    return key if _TAKES_CRYPTOGRAPHY_OBJECTS else crypto.PKey.from_cryptography_key(key)


def not_valid_after(cert: x509.Certificate) -> datetime.datetime:
    """The end of validity, aware (UTC); cryptography 42 deprecates the naive ``not_valid_after``."""
    aware = getattr(cert, "not_valid_after_utc", None)
    if isinstance(aware, datetime.datetime):
        return aware
    return cert.not_valid_after.replace(tzinfo=datetime.UTC)


def not_valid_before(cert: x509.Certificate) -> datetime.datetime:
    """The start of validity, aware (UTC); see :func:`not_valid_after`."""
    aware = getattr(cert, "not_valid_before_utc", None)
    if isinstance(aware, datetime.datetime):
        return aware
    return cert.not_valid_before.replace(tzinfo=datetime.UTC)
