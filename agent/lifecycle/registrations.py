"""For each bank: is the transport certificate it would be sent registered at its registration endpoint?

Read-only and offline: the certificate is the one the TLS layer would present (the token's, or the bank's
``client_certificate`` file), the endpoint is the one in the bank's cached discovery document (a bank not
discovered yet, or whose cache is for another URL, has no known endpoint: ``tpp-agent discover BANK``),
and the answer is the registration log's standing attempt for that pair.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes

from agent.errors import AgentError
from agent.lifecycle.validity import validity_problem
from agent.openfinance.banks import BankConfig
from agent.openfinance.client import BankResponse
from agent.openfinance.discovery import Discovery, DiscoveryError
from agent.openfinance.records import REGISTERED, Attempt, RegistrationLog
from agent.runtime import Runtime
from agent.transport.client import AnswerLimit
from agent.transport.tls import client_chain
from pkcs11_backends.errors import Pkcs11Error

REGISTERED_STATE, NOT_REGISTERED, UNKNOWN = "registered", "not registered", "unknown"


@dataclasses.dataclass(frozen=True)
class BankRegistration:
    bank: str
    endpoint: str | None
    certificate_sha256: str | None
    certificate_subject: str | None
    attempt: Attempt | None  # the standing attempt for (certificate, endpoint): registered, else the last one
    problem: str | None  # why the state is unknown, or why the certificate cannot be presented

    @property
    def state(self) -> str:
        if self.endpoint is None or self.certificate_sha256 is None:
            return UNKNOWN
        if self.attempt is None:
            return NOT_REGISTERED
        return REGISTERED_STATE if self.attempt.outcome == REGISTERED else f"last attempt {self.attempt.outcome}"

    def as_dict(self) -> dict[str, Any]:
        return {"bank": self.bank, "state": self.state, "endpoint": self.endpoint,
                "certificate_sha256": self.certificate_sha256, "certificate_subject": self.certificate_subject,
                "attempt": self.attempt.as_dict() if self.attempt else None, "problem": self.problem}


class _Offline:
    """Discovery's transport for a read-only view: only the cache is read, nothing is fetched."""

    def request(self, method: str, url: str, *, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, interaction_id: str | None = None,
                limit: AnswerLimit = "max_response_bytes") -> BankResponse:
        raise DiscoveryError("not fetched: this view is offline")


def bank_registration(runtime: Runtime, bank: BankConfig, records: RegistrationLog) -> BankRegistration:
    sha256 = subject = endpoint = problem = None
    try:
        certificate = client_chain(runtime, bank.tls)[0]
        sha256 = certificate.fingerprint(hashes.SHA256()).hex()
        subject = certificate.subject.rfc4514_string()
        problem = validity_problem(certificate)
        problem = f"the certificate is {problem}: it is never presented" if problem else None
    except (AgentError, Pkcs11Error) as exc:
        problem = f"no transport certificate: {exc}"
    cached = Discovery(bank, runtime.config.state_dir, _Offline()).cached()
    if cached is None or cached.url != bank.discovery_url or cached.issuer != bank.issuer:
        problem = problem or f"registration endpoint not known: discover it with `tpp-agent discover {bank.name}`"
    else:
        try:
            endpoint = cached.endpoint("registration_endpoint", bank.use_mtls_aliases)
        except DiscoveryError as exc:
            problem = problem or str(exc)
    attempt = records.standing(sha256, endpoint) if sha256 and endpoint else None
    return BankRegistration(bank.name, endpoint, sha256, subject, attempt, problem)
