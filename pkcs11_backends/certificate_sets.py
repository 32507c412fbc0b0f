"""A key's certificates on the token as one unit: stored with their chain (or not at all), and read back.

The token sessions these need stay here; agent/x509/certificates.py decides what to store (parsing, checks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pkcs11

from pkcs11_backends import certificates as token_certs
from pkcs11_backends.certificates import StoredCertificate
from pkcs11_backends.keys import KeyInfo
from pkcs11_backends.sessions import PooledSession, SessionPool


@dataclasses.dataclass(frozen=True)
class Stored:
    certificate: StoredCertificate
    chain_added: tuple[str, ...]  # labels of the chain certificates this call stored
    replaced: int  # older certificates of the key removed
    already_present: bool


def store_with_chain(pool: SessionPool, key: KeyInfo, leaf_der: bytes, chain: Sequence[tuple[bytes, str]], *,
                     replace: bool) -> Stored:
    """Store ``leaf_der`` for ``key`` and each (DER, label) of ``chain`` the token lacks; on a failure, remove what
    this call created. ``replace``: remove the key's other certificates."""
    with pool.session() as pooled:
        session = pooled.session
        existing = token_certs.find_certificates(session, key.id)
        present = any(c.der == leaf_der for c in existing)
        created: list[bytes] = []
        chain_added: list[str] = []
        try:
            if not present:
                token_certs.store_certificate(session, leaf_der, key.label, key.id)
                created.append(leaf_der)
            for der, label in chain:
                if not token_certs.has_certificate(session, der):
                    chain_added.append(token_certs.store_ca_certificate(session, der, label).label)
                    created.append(der)
        except Exception:  # store_certificate already names the token's refusal
            _roll_back(session, created)
            raise
        replaced = token_certs.delete_certificates(session, key.id, keep=leaf_der) if replace else 0
        stored = next((c for c in existing if c.der == leaf_der), None) or StoredCertificate(key.label, key.id,
                                                                                               leaf_der)
    return Stored(stored, tuple(chain_added), replaced, present)


def _roll_back(session: pkcs11.Session, created: list[bytes]) -> None:
    for der in created:
        try:
            token_certs.delete_certificate(session, der)
        except pkcs11.PKCS11Error:
            continue  # keep removing the rest; the original error is what the operator needs


def read_with_chain(pool: SessionPool, key: KeyInfo) -> tuple[list[StoredCertificate], list[StoredCertificate]]:
    """The key's certificates, the newest (longest valid) first, and the chain the token holds for that one."""
    def read(pooled: PooledSession) -> tuple[list[StoredCertificate], list[StoredCertificate]]:
        certs = sorted(token_certs.find_certificates(pooled.session, key.id), key=lambda c: c.not_after,
                       reverse=True)
        return certs, (token_certs.find_chain(pooled.session, certs[0].der) if certs else [])

    return pool.call(read)
