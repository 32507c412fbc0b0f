"""PKCS#10 requests for a key, signed on the token: an admin's operation, never for a tls or audit key.

A transport key's CSR is the operator's step (``tpp-agent csr`` on the host, before the agent serves): over
the socket, a CSR for it would let a caller choose the subject the directory certifies for the agent's
TLS identity.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, TypedDict

from agent.config import KeyPurpose
from agent.operations.core import Context
from agent.operations.inputs import text
from agent.operations.spec import Access, Operation, Resource, Spec
from agent.x509.csr import build_csr
from agent.x509.signatures import CsrAlgorithm
from agent.x509.subject import parse_subject


@dataclasses.dataclass(frozen=True)
class CsrInput:
    subject: str = text(1024)  # RFC 4514, e.g. "CN=client-id,OU=org-id,O=Name,C=AE"
    alg: str | None = text(16, None)


class CsrAnswer(TypedDict):
    key: str
    alg: str
    pem: Annotated[str, "the PKCS#10 request, PEM"]


def make_csr(context: Context, given: CsrInput) -> dict[str, Any]:
    subject = parse_subject(given.subject)
    algorithm = CsrAlgorithm.parse(given.alg) if given.alg else None
    signed = build_csr(context.core.signer, context.key_config.alias, subject, algorithm)
    return {"key": context.key_config.alias, "alg": signed.scheme.jose_name, "pem": signed.pem}


SPECS: tuple[Spec[Any], ...] = (
    Spec("csr", Operation.CSR, "a CSR for a jws or encryption key (admins only)", Resource.KEY, CsrInput, make_csr,
         access=Access.ADMIN, purposes=frozenset({KeyPurpose.JWS, KeyPurpose.ENCRYPTION}), result=CsrAnswer),
)
