"""The directory's certificate API as operations (admins only): list the software statement's certificates, upload
a CSR to make one, download an issued one onto the token next to its key, revoke one with a reason.

Each call gets a ``directory:software`` token first (``client_credentials``, ``tls_client_auth`` over mTLS with
the transport key, agent/directory/client.py). Nothing is changed on the token unless the directory's certificate
is for the named key: a CSR for another key than ``key`` is not sent, and a certificate for another key is not
imported.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.directory.client import DirectoryCertificateMismatchError, certificate_type
from agent.errors import InputError
from agent.operations.banks import BankAnswer
from agent.operations.core import Context
from agent.operations.inputs import Nothing, text
from agent.operations.spec import Access, Operation, Resource, Spec
from agent.x509.certificates import import_certificate

MAX_CSR = 16 << 10  # an RSA-4096 CSR in PEM is under 2 KiB
_Kind = Annotated[str, "the directory's certificate type: rtstransport, rtssigning or enckey"]

# Functional syntax: "x5t#S256" is no identifier.
DirectoryCertificateEntry = TypedDict("DirectoryCertificateEntry", {
    "id": Annotated[str, "CertificateOrKeyId"],
    "type": Annotated[str, "CertificateOrKeyType, as the directory names it"],
    "status": Annotated[str, "Active, Revoked... as the directory says (empty when it says nothing)"],
    "x5t#S256": str | None,
    "expires": Annotated[str | None, "ExpiryDateTime"],
    "revoke_reason": str | None,
    "signed_cert_path": Annotated[str | None, "where the directory publishes the certificate"],
    "subject": Annotated[str | None, "RFC 4514, from the answer's x5c (None: it carries none)"],
})
DirectoryCertificateEntry.__doc__ = "A certificate of the software statement, as the directory lists it."


class DirectoryCertificates(BankAnswer):
    certificates: list[DirectoryCertificateEntry]


class CreatedCertificate(DirectoryCertificateEntry, BankAnswer):
    """The certificate the directory made for the CSR (its key checked to be the CSR's)."""


class ImportedCertificate(BankAnswer):
    id: str
    type: _Kind
    key: Annotated[str, "CKA_LABEL of the token key the certificate is stored with"]
    subject: str
    not_after: Annotated[str, "ISO 8601"]
    sha256: Annotated[str, "of the DER, hex"]
    already_present: Annotated[bool, "the token held this certificate already: nothing was stored"]
    chain_added: Annotated[list[str], "labels of the CA certificates stored with it"]
    replaced: Annotated[int, "the key's other certificates removed (replace: true)"]


class RevokedCertificate(BankAnswer):
    id: str
    type: _Kind
    revoked: Literal[True]
    reason: str


@dataclasses.dataclass(frozen=True)
class CreateInput:
    type: str = text(32)  # transport | signing | encryption, or the directory's rtstransport | rtssigning | enckey
    csr: str = text(MAX_CSR)  # PEM, as `tpp-agent csr` writes it
    key: str | None = text(1024, None)  # the token key the CSR must be for (alias or pkcs11: URI): checked first


@dataclasses.dataclass(frozen=True)
class ImportInput:
    id: str = text(128)  # CertificateOrKeyId
    type: str = text(32)
    key: str = text(1024)  # the token key it is for (alias or pkcs11: URI)
    replace: bool = False  # remove the key's other certificates (default: kept, for a rotation's overlap)


@dataclasses.dataclass(frozen=True)
class RevokeInput:
    id: str = text(128)
    type: str = text(32)
    reason: str = text(32)


def certificates(context: Context, _: Nothing) -> dict[str, Any]:
    return {"certificates": [c.as_dict() for c in context.core.directory.client.certificates()]}


def create(context: Context, given: CreateInput) -> dict[str, Any]:
    kind = certificate_type(given.type)
    try:
        csr = x509.load_pem_x509_csr(given.csr.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise InputError("csr is not a PEM certificate signing request", hint="make one with `tpp-agent csr`") \
            from None
    if given.key is not None:
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if csr.public_key().public_bytes(*spki) != context.core.keys.public_key_info(given.key).dump():
            raise InputError(f"the CSR is not for key {given.key!r}: nothing was sent to the directory",
                             hint=f"make the CSR with `tpp-agent csr --key {given.key} ...`")
    context.log["certificate_type"] = kind
    return context.core.directory.client.create_certificate(kind, given.csr).as_dict()


def import_issued(context: Context, given: ImportInput) -> dict[str, Any]:
    kind = certificate_type(given.type)
    client = context.core.directory.client
    issued = client.certificate(kind, given.id)
    if issued.status.lower() == "revoked":
        raise InputError(f"directory certificate {given.id} is revoked: it is not imported",
                         hint="list the certificates (tpp-agent directory certs list) and import an active one")
    pem = client.download(issued)
    leaf = x509.load_pem_x509_certificate(pem)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != context.core.keys.public_key_info(given.key).dump():
        raise DirectoryCertificateMismatchError(
            f"directory certificate {given.id} ({leaf.subject.rfc4514_string()}) is for another key, not "
            f"{given.key!r}: nothing was imported")
    stored = import_certificate(context.core.keys, given.key, pem, f"directory certificate {given.id}",
                                replace=given.replace)
    cert = stored.certificate
    return {"id": issued.id, "type": kind, "key": cert.label, "subject": cert.subject,
            "not_after": cert.not_after.isoformat(), "sha256": cert.sha256_fingerprint,
            "already_present": stored.already_present, "chain_added": list(stored.chain_added),
            "replaced": stored.replaced}


def revoke(context: Context, given: RevokeInput) -> dict[str, Any]:
    kind = certificate_type(given.type)
    context.core.directory.client.revoke(kind, given.id, given.reason)
    return {"id": given.id, "type": kind, "revoked": True, "reason": given.reason}


SPECS: tuple[Spec[Any], ...] = (
    Spec("directory_certificates", Operation.DIRECTORY, "the software statement's certificates in the directory",
         Resource.NONE, Nothing, certificates, access=Access.ADMIN, calls_bank=True,
         result=DirectoryCertificates),
    Spec("directory_create", Operation.DIRECTORY, "upload a CSR: the directory makes a certificate", Resource.NONE,
         CreateInput, create, access=Access.ADMIN, calls_bank=True,
         result=CreatedCertificate),
    Spec("directory_import", Operation.DIRECTORY, "download an issued certificate onto the token", Resource.NONE,
         ImportInput, import_issued, access=Access.ADMIN, calls_bank=True,
         result=ImportedCertificate),
    Spec("directory_revoke", Operation.DIRECTORY, "revoke a certificate in the directory, with a reason",
         Resource.NONE, RevokeInput, revoke, access=Access.ADMIN, calls_bank=True,
         result=RevokedCertificate),
)
