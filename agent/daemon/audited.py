"""Key uses the daemon makes on a caller's behalf deep inside a flow (JWS, client assertions, request objects,
bank calls).

The JOSE and token code signs through a :class:`~pkcs11_backends.keys.KeyStore`; the daemon hands them an
:class:`AuditedKeyStore`, which writes one audit record per signature, attributed to the caller the endpoint
named with :func:`on_behalf_of`. A signature is returned only once its record is on disk. Every request to a
bank is a use of the transport key (TLS client authentication): :class:`AuditedBankCalls` records those.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

from agent.audit import AuditTrail, KeyUse
from agent.daemon.http import Request
from agent.openfinance.service import BankCall
from pkcs11_backends.keys import KeyStore, SignatureScheme
from pkcs11_backends.uri import Pkcs11Uri


@dataclasses.dataclass(frozen=True)
class _Caller:
    uid: int
    pid: int
    operation: str
    interaction_id: str


_caller: contextvars.ContextVar[_Caller | None] = contextvars.ContextVar("tpp_agent_caller", default=None)


@contextlib.contextmanager
def on_behalf_of(request: Request, operation: str) -> Iterator[None]:
    """Attribute the signatures made inside the block to ``request``'s peer and ``operation``."""
    reset = _caller.set(_Caller(request.peer.uid, request.peer.pid, operation, request.interaction_id))
    try:
        yield
    finally:
        _caller.reset(reset)


def _current_caller(what: str) -> _Caller:
    caller = _caller.get()
    if caller is None:
        # A code path that uses a key without saying for whom is a bug: refuse rather than use it unaudited.
        raise RuntimeError(f"{what} outside on_behalf_of()")
    return caller


class AuditedKeyStore(KeyStore):
    """The same token keys (same session pool and aliases), every ``sign`` audited."""

    def __init__(self, store: KeyStore, audit: AuditTrail) -> None:
        super().__init__(store.pool, store.aliases)
        self.audit = audit

    def sign(self, name: str | Pkcs11Uri, data: bytes, scheme: SignatureScheme,
             timeout: float | None = None) -> bytes:
        caller = _current_caller("AuditedKeyStore.sign")
        key = self.aliases.get(name, name) if isinstance(name, str) else str(name)
        use = KeyUse(caller.uid, caller.pid, key, caller.operation, scheme.jose_name, data, "ok",
                     caller.interaction_id)
        try:
            signature = super().sign(name, data, scheme, timeout)
        except Exception as exc:
            self.audit.record(dataclasses.replace(use, result=f"error: {type(exc).__name__}"))
            raise
        self.audit.record(use)
        return signature


class AuditedBankCalls:
    """An ``OpenFinance`` observer: one audit record per request sent with the transport key."""

    def __init__(self, audit: AuditTrail) -> None:
        self.audit = audit

    def bank_call(self, call: BankCall) -> None:
        caller = _current_caller(f"a request to bank {call.bank!r}")
        self.audit.record(KeyUse(caller.uid, caller.pid, call.key, caller.operation, "tls-client-auth",
                                 f"{call.method} {call.url}\n".encode() + (call.body or b""), call.result,
                                 call.interaction_id or caller.interaction_id))
