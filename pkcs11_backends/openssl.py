"""The process's OpenSSL: proof that pyOpenSSL shares the system libssl, and where the
PKCS#11 engine (libp11) and provider (pkcs11-provider) live.

A token key reaches pyOpenSSL as an ``EVP_PKEY*`` created by the system libcrypto
(engine or provider); that only works when pyOpenSSL's binding is linked to that
same shared library, not to a copy inside a PyPI wheel.
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import os
from pathlib import Path

from pkcs11_backends.errors import Pkcs11Error

_SYSTEM_PREFIXES = ("/usr/lib/", "/lib/", "/usr/lib64/", "/lib64/", "/usr/local/lib/")
_MULTIARCH_GLOBS = ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib")


class OpenSSLLinkageError(Pkcs11Error):
    hint = ("recreate the venv from /usr/bin/python3 with --system-site-packages and the distribution's "
            "python3-openssl/python3-cryptography (`rm -rf .venv && make setup`); never pip-install cryptography")


@dataclasses.dataclass(frozen=True)
class Linkage:
    libssl: str
    libcrypto: str
    version: str


def _mapped(name: str) -> set[str]:
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    return {p for p in paths if os.path.basename(p).startswith(name)}


def check_linkage() -> Linkage:
    """Import pyOpenSSL and prove that it runs on the system's shared libssl/libcrypto."""
    try:
        import OpenSSL.SSL
    except ImportError as exc:
        raise OpenSSLLinkageError(f"pyOpenSSL is not importable: {exc}") from exc
    libssl, libcrypto = _mapped("libssl.so"), _mapped("libcrypto.so")
    foreign = sorted(p for p in libssl | libcrypto if not p.startswith(_SYSTEM_PREFIXES))
    if foreign:
        raise OpenSSLLinkageError(f"pyOpenSSL runs on a private OpenSSL copy: {', '.join(foreign)}")
    if len(libssl) != 1 or len(libcrypto) != 1:
        found = ", ".join(sorted(libssl | libcrypto)) or "none"
        raise OpenSSLLinkageError(
            f"pyOpenSSL is not linked to one shared system OpenSSL (mapped: {found}); "
            "a statically linked cryptography wheel cannot use token keys")
    version = OpenSSL.SSL.OpenSSL_version(OpenSSL.SSL.OPENSSL_VERSION).decode("ascii", "replace")
    return Linkage(libssl.pop(), libcrypto.pop(), version)


def libcrypto() -> ctypes.CDLL:
    """The system libcrypto, as already mapped into this process by pyOpenSSL."""
    return ctypes.CDLL(check_linkage().libcrypto)


def libssl() -> ctypes.CDLL:
    return ctypes.CDLL(check_linkage().libssl)


def find_engine() -> Path | None:
    """libp11's OpenSSL engine (Debian: libengine-pkcs11-openssl)."""
    for pattern in (f"{d}/engines-3/pkcs11.so" for d in _MULTIARCH_GLOBS):
        for hit in sorted(glob.glob(pattern)):
            return Path(hit)
    return None


def find_provider() -> Path | None:
    """pkcs11-provider (Debian 13: pkcs11-provider)."""
    for pattern in (f"{d}/ossl-modules/pkcs11.so" for d in _MULTIARCH_GLOBS):
        for hit in sorted(glob.glob(pattern)):
            return Path(hit)
    return None
