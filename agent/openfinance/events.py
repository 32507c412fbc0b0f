"""Events a bank POSTs to the TPP's webhook: decrypted on the token, verified, checked against replay.

The hub sends ``Content-Type: application/jwe``: a JWE (RSA-OAEP-256 / A256GCM, ``cty: JWT``) encrypted to the
TPP's encryption key, around a PS256 JWS signed by the bank with ``iss`` (the bank), ``aud`` ⊇ client_id, ``exp``,
``nbf``, ``jti`` and ``message {Data, Meta{EventDateTime, EventResource, EventType, ConsentId}}``.

    receiver = EventReceiver(bank="mb", issuer=..., client_id=..., jwks=bank_jwks,
                             recipients=[jwe.Recipient(kid, lambda cek: signer.decrypt_oaep_sha256(uri, cek))],
                             replay=ReplayGuard(store=StateReplayStore(state, "mb")))  # the unwrap is audited
    event = receiver.receive(body, content_type)
    event.decrypted_with    # the kid of the key that decrypted it (a rotation keeps two, or a retired one)

Order matters: the JWE is opened, then the inner signature and claims are verified, and only then is the ``jti``
recorded, so that nobody but the bank can fill the replay store. The store is bounded: events whose ``exp`` is more
than ``max_lifetime`` ahead are refused (their ``jti`` could not be remembered long enough), and a full store of
unexpired entries refuses new events rather than forget one (the hub sends again later).
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Protocol

from agent.jose import jwe
from agent.jose.errors import ClaimRejectedError, MalformedError, ReplayError
from agent.jose.verify import LEEWAY, verify_jws
from agent.openfinance.jwks import BankJwks

CONTENT_TYPES = ("application/jwe", "application/jose")
DEFAULT_MAX_LIFETIME = 24 * 3600
DEFAULT_MAX_ENTRIES = 100_000


class ReplayStore(Protocol):
    """Where seen ``jti`` values live: this process (:class:`MemoryReplayStore`) or a database the serving
    processes and hosts share (:class:`agent.openfinance.flow_state.StateReplayStore`)."""

    def add(self, jti: str, until: float, *, now: float, max_entries: int) -> Seen:
        """Record ``jti`` until ``until`` in one step: NEW, SEEN (remembered and not expired) or FULL."""

    def __len__(self) -> int: ...


class Seen(enum.Enum):
    NEW = "new"
    SEEN = "seen"
    FULL = "full"


class MemoryReplayStore:
    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, jti: str, until: float, *, now: float, max_entries: int) -> Seen:
        with self._lock:
            if self._seen.get(jti, now - 1) >= now:
                return Seen.SEEN
            if len(self._seen) >= max_entries:
                self._seen = {j: kept for j, kept in self._seen.items() if kept >= now}
            if len(self._seen) >= max_entries:
                return Seen.FULL
            self._seen[jti] = until
            return Seen.NEW


class ReplayGuard:
    """``jti`` values seen, each kept until its ``exp`` (plus leeway); at most ``max_entries``."""

    def __init__(self, *, store: ReplayStore | None = None, max_entries: int = DEFAULT_MAX_ENTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store if store is not None else MemoryReplayStore()
        self.max_entries, self.clock = max_entries, clock

    def __len__(self) -> int:
        return len(self.store)

    def record(self, jti: str, exp: float) -> None:
        """Remember ``jti`` until ``exp``; :class:`ReplayError` if it is already remembered."""
        seen = self.store.add(jti, exp + LEEWAY, now=self.clock(), max_entries=self.max_entries)
        if seen is Seen.SEEN:
            raise ReplayError(f"event jti {jti!r} was already received")
        if seen is Seen.FULL:
            raise ClaimRejectedError(f"{self.max_entries} unexpired events are remembered; this one is refused "
                                     "until some expire", hint="the bank will deliver it again")


@dataclasses.dataclass(frozen=True)
class BankEvent:
    bank: str
    jti: str
    event_type: str | None
    consent_id: str | None
    resource: str | None
    event_time: str | None
    message: dict[str, Any]
    claims: dict[str, Any]
    # The kid of our key that decrypted it: in a rotation, which key the bank encrypts to now.
    decrypted_with: Annotated[str, "the kid of the TPP's encryption key that decrypted the JWE"]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class EventReceiver:
    def __init__(self, *, bank: str, issuer: str, client_id: str, jwks: BankJwks,
                 recipients: Sequence[jwe.Recipient], replay: ReplayGuard, max_lifetime: int = DEFAULT_MAX_LIFETIME,
                 clock: Callable[[], float] = time.time) -> None:
        self.bank, self.issuer, self.client_id = bank, issuer, client_id
        self.jwks, self.recipients = jwks, recipients
        self.replay, self.max_lifetime, self.clock = replay, max_lifetime, clock

    def receive(self, body: bytes, content_type: str | None = None) -> BankEvent:
        """The event in ``body`` once every check passed; a :class:`VerificationError` subclass otherwise."""
        if content_type is not None and content_type.split(";")[0].strip().lower() not in CONTENT_TYPES:
            raise MalformedError(f"event: Content-Type {content_type!r}; the hub sends application/jwe")
        try:
            token = body.decode("ascii").strip()
        except UnicodeDecodeError:
            raise MalformedError("event: the body is not a compact JWE") from None
        opened = jwe.decrypt(token, self.recipients)
        if str(opened.header.get("cty", "")).upper() != "JWT":
            raise MalformedError("event: the JWE's cty is not JWT: a signed event is required inside")
        try:
            inner = opened.plaintext.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedError("event: the JWE does not contain a compact JWS") from None
        now = self.clock()
        verified = verify_jws(inner, self.jwks.signing_key, issuer=self.issuer, audience=self.client_id, now=now,
                              require=("iss", "aud", "exp", "jti"), what="event")
        claims = verified.claims
        jti, exp = claims["jti"], claims["exp"]
        if not isinstance(jti, str) or not jti:
            raise ClaimRejectedError("event: jti must be a non-empty string")
        if exp - now > self.max_lifetime:
            raise ClaimRejectedError(f"event: exp is {int(exp - now)} s ahead; at most {self.max_lifetime} s is "
                                     "accepted (its jti must be remembered until then)")
        message = claims.get("message")
        if not isinstance(message, dict):
            raise ClaimRejectedError("event: the message claim is missing or not an object")
        self.replay.record(jti, exp)
        found = message.get("Meta")
        meta: dict[str, Any] = found if isinstance(found, dict) else {}
        return BankEvent(self.bank, jti, _text(meta, "EventType"), _text(meta, "ConsentId"),
                         _text(meta, "EventResource"), _text(meta, "EventDateTime"), message, claims, opened.kid)


def _text(meta: dict[str, Any], name: str) -> str | None:
    value = meta.get(name)
    return value if isinstance(value, str) else None
