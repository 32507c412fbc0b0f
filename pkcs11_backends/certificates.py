"""X.509 certificate objects on the token (``CKO_CERTIFICATE``), paired to keys by ``CKA_ID``."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib

import pkcs11
from asn1crypto import x509
from cryptography.x509 import load_der_x509_certificate
from pkcs11 import Attribute, CertificateType, ObjectClass

from pkcs11_backends.errors import CertificateStoreError


@dataclasses.dataclass(frozen=True)
class StoredCertificate:
    label: str
    id: bytes
    der: bytes

    @property
    def parsed(self) -> x509.Certificate:
        return x509.Certificate.load(self.der)

    @property
    def not_after(self) -> datetime.datetime:
        value: datetime.datetime = self.parsed["tbs_certificate"]["validity"]["not_after"].native
        return value

    @property
    def not_before(self) -> datetime.datetime:
        value: datetime.datetime = self.parsed["tbs_certificate"]["validity"]["not_before"].native
        return value

    @property
    def subject(self) -> str:
        """RFC 4514, most specific RDN first: as the agent shows every subject."""
        try:
            return load_der_x509_certificate(self.der).subject.rfc4514_string()
        except ValueError:  # another tool stored something cryptography cannot read: show what asn1crypto reads
            return str(self.parsed.subject.human_friendly)

    @property
    def sha256_fingerprint(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    def as_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "subject": self.subject,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "sha256": self.sha256_fingerprint,
        }


def _stored(obj: pkcs11.Object) -> StoredCertificate:
    return StoredCertificate(obj[Attribute.LABEL], bytes(obj[Attribute.ID]), bytes(obj[Attribute.VALUE]))


def find_certificates(session: pkcs11.Session, key_id: bytes) -> list[StoredCertificate]:
    found = session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: key_id})
    return [_stored(obj) for obj in found]


def find_certificate(session: pkcs11.Session, key_id: bytes) -> StoredCertificate | None:
    """The newest (latest ``notAfter``) certificate stored for a key, if any."""
    certs = find_certificates(session, key_id)
    return max(certs, key=lambda c: c.not_after) if certs else None


def store_certificate(session: pkcs11.Session, der: bytes, label: str, key_id: bytes) -> StoredCertificate:
    cert = x509.Certificate.load(der)
    tbs = cert["tbs_certificate"]
    try:
        session.create_object({
            Attribute.CLASS: ObjectClass.CERTIFICATE,
            Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.LABEL: label,
            Attribute.ID: key_id,
            Attribute.SUBJECT: tbs["subject"].dump(),
            Attribute.ISSUER: tbs["issuer"].dump(),
            Attribute.SERIAL_NUMBER: tbs["serial_number"].dump(),
            Attribute.VALUE: der,
        })
    except pkcs11.PKCS11Error as exc:
        raise CertificateStoreError(f"the token refused to store the certificate: {exc!r}") from exc
    return StoredCertificate(label, key_id, der)


def delete_certificates(session: pkcs11.Session, key_id: bytes, keep: bytes | None = None) -> int:
    """Remove certificates stored for a key (all but ``keep``, a DER value); returns how many."""
    removed = 0
    for obj in list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: key_id})):
        if keep is not None and bytes(obj[Attribute.VALUE]) == keep:
            continue
        obj.destroy()
        removed += 1
    return removed


# -- CA certificates of a key's chain -------------------------------------------
# They are stored as CKO_CERTIFICATE objects with their own label and, as CKA_ID,
# their subject key identifier (never a key's CKA_ID, so that
# find_certificate() only sees end-entity certificates). A leaf finds its chain by
# CKA_SUBJECT == issuer, the usual PKCS#11 way.

def has_certificate(session: pkcs11.Session, der: bytes) -> bool:
    return bool(list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.VALUE: der})))


def store_ca_certificate(session: pkcs11.Session, der: bytes, label: str) -> StoredCertificate:
    cert = x509.Certificate.load(der)
    key_id = cert.key_identifier or cert.public_key.sha1
    return store_certificate(session, der, label, key_id)


def delete_certificate(session: pkcs11.Session, der: bytes) -> int:
    """Remove every certificate object holding exactly ``der``; returns how many."""
    found = list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.VALUE: der}))
    for obj in found:
        obj.destroy()
    return len(found)


def find_chain(session: pkcs11.Session, leaf_der: bytes, limit: int = 8) -> list[StoredCertificate]:
    """The issuers of a certificate found on the token, nearest first, up to a self-signed root."""
    chain: list[StoredCertificate] = []
    current = x509.Certificate.load(leaf_der)
    while len(chain) < limit and not current.self_issued:
        issuer = current.issuer.dump()
        found = [_stored(obj) for obj in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE,
                                                              Attribute.SUBJECT: issuer})]
        found = [c for c in found if c.der not in {s.der for s in chain} and c.der != leaf_der]
        if not found:
            break
        nearest = max(found, key=lambda c: c.not_after)
        chain.append(nearest)
        current = nearest.parsed
    return chain
