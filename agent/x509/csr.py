"""PKCS#10 certificate signing requests, signed on the token.

The request carries the subject and the token key's public half, nothing else: no
extensions, no SAN, an empty attribute set (the directory's profile). The private
key is only used through ``KeyStore.sign``; before a CSR is handed out its signature
is checked in software against the public key read from the token, so a broken
signature (token fault, wrong mechanism) never leaves this module.
"""

from __future__ import annotations

import dataclasses

from asn1crypto import csr, pem, x509

from agent.errors import AgentError
from agent.x509.signatures import CsrAlgorithm, algorithm_identifier, der_signature, is_valid
from pkcs11_backends.keys import KeyStore, SignatureScheme


class CsrSignatureError(AgentError):
    hint = "the token returned a signature that does not verify: check the token and the key, then retry"


@dataclasses.dataclass(frozen=True)
class SignedCsr:
    request: csr.CertificationRequest
    scheme: SignatureScheme

    @property
    def der(self) -> bytes:
        return bytes(self.request.dump())

    @property
    def pem(self) -> str:
        return str(pem.armor("CERTIFICATE REQUEST", self.der).decode("ascii"))


def build_csr(store: KeyStore, key: str, subject: x509.Name, algorithm: CsrAlgorithm | None = None) -> SignedCsr:
    """A CSR for ``subject`` and the token key ``key`` (URI or alias), signed by that key."""
    uri = store.resolve(key)
    spki = store.public_key_info(key)
    scheme = (algorithm or CsrAlgorithm.default_for(spki)).scheme_for(spki)
    info = csr.CertificationRequestInfo({
        "version": "v1",
        "subject": subject,
        "subject_pk_info": spki,
        "attributes": csr.CRIAttributes([]),
    })
    to_be_signed = bytes(info.dump())
    signature = der_signature(scheme, store.sign(uri, to_be_signed, scheme))
    signature_algorithm = algorithm_identifier(scheme)
    if not is_valid(spki, signature_algorithm, signature, to_be_signed):
        raise CsrSignatureError(f"the CSR signature made by {key} ({scheme.jose_name}) does not verify; "
                                "no CSR was written")
    request = csr.CertificationRequest({
        "certification_request_info": info,
        "signature_algorithm": signature_algorithm,
        "signature": signature,
    })
    return SignedCsr(request, scheme)
