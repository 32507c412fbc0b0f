"""Importing the certificate the directory issued for a token key, and reading it back.

What ``import_certificate`` does, in this order, and why:

1. Reads PEM (the leaf first, then its chain, as ``fullchain.pem`` files are laid out)
   or a single DER certificate. A file that carries a private key is refused: the
   key lives on the token, a key file next to it is a leak.
2. Checks everything before writing anything: the leaf's public key is the token
   key's (compared as keys, not encodings); the leaf and every chain certificate
   are inside their validity period; each chain certificate issued the one before it
   (names and signature). Any failure: nothing on the token changes.
3. Stores the leaf as ``CKO_CERTIFICATE`` with the key's ``CKA_ID`` and label. An older
   certificate of the same key is *kept* (rotation: old and new overlap while banks
   refresh); the one with the latest ``notAfter`` is the one used. ``replace=True``
   removes the others once the new one is stored.
4. Stores chain certificates not yet on the token as separate ``CKO_CERTIFICATE``
   objects (label ``ca:<CN>``, ``CKA_ID`` = their subject key identifier, never a key's id),
   so the token alone holds what a TLS client needs to present.

If the token fails half-way, what this import created is removed again.
"""

from __future__ import annotations

import dataclasses
import datetime
import re

from asn1crypto import pem, x509

from agent.errors import InputError
from agent.x509.signatures import is_valid, same_public_key
from agent.x509.subject import rfc4514
from pkcs11_backends.certificate_sets import Stored, read_with_chain, store_with_chain
from pkcs11_backends.certificates import StoredCertificate
from pkcs11_backends.keys import KeyStore

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
IMPORT_HINT = "give the PEM (or DER) certificate the directory issued for this key's CSR"


class CertificateMismatchError(InputError):
    hint = "import the certificate issued for this key's CSR, or name the key it belongs to with --key"


class CertificateValidityError(InputError):
    hint = "get a current certificate from the directory (make a new CSR with `tpp-agent csr` if needed)"


def read_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    """The certificates in a PEM bundle or a DER file; leaf first."""
    if pem.detect(data):
        found = [match.group(1).decode() for match in _PEM_BLOCK.finditer(data)]
        if any("PRIVATE KEY" in kind for kind in found):
            raise InputError(f"{source} contains a private key; tpp-agent never imports private keys",
                             hint="delete that file securely: the key for this certificate lives on the token")
        certs = []
        try:
            for kind, _, der in pem.unarmor(data, multiple=True):
                if kind == "CERTIFICATE":
                    certs.append(_load(der, source))
        except ValueError as exc:
            raise InputError(f"{source} is not valid PEM: {exc}", hint=IMPORT_HINT) from None
        if not certs:
            raise InputError(f"{source} holds no CERTIFICATE block (found: {', '.join(found) or 'none'})",
                             hint=IMPORT_HINT)
        return certs
    return [_load(data, source)]


def _load(der: bytes, source: str) -> x509.Certificate:
    try:
        cert = x509.Certificate.load(der, strict=True)
        _ = cert.native  # parse every field now, not later in the middle of the import
    except (ValueError, TypeError, KeyError):  # asn1crypto: KeyError for an algorithm OID it cannot map
        raise InputError(f"{source} is neither a PEM nor a DER X.509 certificate", hint=IMPORT_HINT) from None
    return cert


def check_validity(cert: x509.Certificate, now: datetime.datetime, what: str) -> None:
    validity = cert["tbs_certificate"]["validity"]
    not_before, not_after = validity["not_before"].native, validity["not_after"].native
    if now > not_after:
        raise CertificateValidityError(f"{what} expired on {not_after:%Y-%m-%d %H:%M} UTC")
    if now < not_before:
        raise CertificateValidityError(f"{what} is not valid before {not_before:%Y-%m-%d %H:%M} UTC",
                                       hint="check the system clock, or import it once it is valid")


def _describe(cert: x509.Certificate) -> str:
    return f"certificate {rfc4514(cert.subject)}"


def check_chain(leaf: x509.Certificate, chain: list[x509.Certificate], now: datetime.datetime) -> None:
    check_validity(leaf, now, f"the {_describe(leaf)}")
    child = leaf
    for position, issuer in enumerate(chain, start=2):
        what = f"{_describe(issuer)} (number {position} in the file)"
        check_validity(issuer, now, what)
        if child.issuer != issuer.subject or not is_valid(issuer.public_key, child["signature_algorithm"],
                                                           child.signature, child["tbs_certificate"].dump()):
            raise InputError(f"{what} did not issue {_describe(child)}",
                             hint="order the file leaf first, then its issuer, then that one's issuer")
        child = issuer


def import_certificate(store: KeyStore, key: str, data: bytes, source: str, *, replace: bool = False,
                       now: datetime.datetime | None = None) -> Stored:
    now = now or datetime.datetime.now(datetime.UTC)
    leaf, *chain = read_certificates(data, source)
    info = store.info(key)
    if not same_public_key(leaf.public_key, store.public_key_info(key)):
        raise CertificateMismatchError(
            f"the certificate in {source} ({rfc4514(leaf.subject)}) is for another key, not {info.label!r}")
    check_chain(leaf, chain, now)
    leaf_der = bytes(leaf.dump())
    return store_with_chain(store.pool, info, leaf_der, [(bytes(c.dump()), _ca_label(c)) for c in chain],
                            replace=replace)


def _ca_label(cert: x509.Certificate) -> str:
    names = [atv["value"].native for rdn in cert.subject.chosen for atv in rdn if atv["type"].native == "common_name"]
    return f"ca:{names[-1] if names else cert.sha256.hex()[:16]}"[:128]


@dataclasses.dataclass(frozen=True)
class KeyCertificates:
    """A key's certificates, the one in use first, and the chain the token holds for it."""

    key_label: str
    certificates: tuple[StoredCertificate, ...]
    chain: tuple[StoredCertificate, ...]

    @property
    def current(self) -> StoredCertificate | None:
        return self.certificates[0] if self.certificates else None


def key_certificates(store: KeyStore, key: str) -> KeyCertificates:
    info = store.info(key)
    certs, chain = read_with_chain(store.pool, info)
    return KeyCertificates(info.label, tuple(certs), tuple(chain))


def days_left(cert: StoredCertificate, now: datetime.datetime | None = None) -> float:
    now = now or datetime.datetime.now(datetime.UTC)
    return (cert.not_after - now).total_seconds() / 86400
