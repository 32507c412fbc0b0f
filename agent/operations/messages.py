"""Signed and encrypted messages with a bank: its JWS verified, our bodies signed, personal data encrypted to it,
its events decrypted.

Each acts on one bank: the bank's keys come from its JWKS (``jwks_uri`` of its verified discovery document,
cached ``[banks.NAME] jwks_ttl``), ours from ``[tokens]``: ``signing_key`` signs (on the token, PS256) and
``encryption_key`` (purpose ``encryption``) decrypts events (on the token, RSA-OAEP-256). The client id is
``[tokens] client_id``, else the transport certificate's CN. Every signature and decryption is a key use in the
audit trail; a verification of the bank's JWS is recorded too (the bank's key, the result), so the trail shows
which answers were checked and what came of it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, Any, TypedDict

from agent import jose
from agent.audit import KeyUse, current_caller
from agent.config import KeyPurpose
from agent.errors import AgentError
from agent.jose import jwe
from agent.jose.errors import VerificationError
from agent.jose.keys import resolved
from agent.jose.verify import MAX_SIZE, unverified_header, verify_jws
from agent.openfinance.events import BankEvent, EventReceiver
from agent.openfinance.payloads import CONTENT_TYPE, encrypted_personal_data, signed_body
from agent.operations.core import Context
from agent.operations.errors import KeyPurposeError, UnknownKeyError
from agent.operations.inputs import InvalidInput, text
from agent.operations.spec import Operation, Resource, Spec

_AUDIENCES = ("array", "string")


class VerifiedAnswer(TypedDict):
    bank: str
    kid: Annotated[str, "the bank's key that signed it (- when the header names none)"]
    header: Annotated[dict[str, Any], "the JWS's protected header"]
    claims: Annotated[dict[str, Any], "its claims, verified (iss, exp, aud, nbf)"]


class SignedBodyAnswer(TypedDict):
    bank: str
    kid: str
    content_type: Annotated[str, "the Content-Type to send it with"]
    jwt: str


class PersonalDataAnswer(TypedDict):
    bank: str
    kid: str
    recipient_kid: Annotated[str | None, "the bank's encryption key it is encrypted to"]
    jwe: str


@dataclasses.dataclass(frozen=True)
class VerifyInput:
    """``jws``: the bank's answer (a payment, refund or CoP answer or error) as received, compact."""

    jws: str = text(MAX_SIZE)
    audience: bool = True  # the answer's aud must contain our client id (false: an API whose answers carry none)


def verify(context: Context, given: VerifyInput) -> dict[str, Any]:
    banks, bank = context.core.banks, context.core.bank(context.bank_name)
    client_id = _client_id(context)
    require = ("iss", "exp", "aud") if given.audience else ("iss", "exp")
    kid = _kid_of(given.jws)
    try:
        verified = verify_jws(given.jws.strip(), banks.jwks(bank.name).signing_key, issuer=bank.issuer,
                              audience=client_id if given.audience else None, require=require,
                              what="the bank's JWS")
    except VerificationError as exc:
        _record_check(context, kid, given.jws, f"refused: {type(exc).__name__}")
        raise
    _record_check(context, kid, given.jws, "ok")
    context.log["kid"] = kid
    return {"bank": bank.name, "kid": kid, **verified.as_dict()}


@dataclasses.dataclass(frozen=True)
class SignedBodyInput:
    message: dict[str, Any] = dataclasses.field(metadata={"max": 256})  # {"Data": ...}
    audience: str = text(8, "array")  # the issuer as a JSON array (payments) or a string (CoP)
    lifetime: int | None = None  # seconds, at most [jose] assertion_lifetime (300)

    def check(self) -> None:
        if self.audience not in _AUDIENCES:
            raise InvalidInput("bad_field", f"field 'audience' must be \"array\" or \"string\", not "
                                            f"{self.audience[:20]!r}",
                               hint="the payments API takes aud as an array, Confirmation of Payee as a string")


def sign_body(context: Context, given: SignedBodyInput) -> dict[str, Any]:
    core, bank = context.core, context.core.bank(context.bank_name)
    key = _signing_key(context)
    audience: str | list[str] = [bank.issuer] if given.audience == "array" else bank.issuer
    token = signed_body(core.signer, core.config, key, client_id=_client_id(context), audience=audience,
                        message=given.message, lifetime=given.lifetime)
    return {"bank": bank.name, "kid": key.kid, "content_type": CONTENT_TYPE, "jwt": token}


@dataclasses.dataclass(frozen=True)
class PersonalDataInput:
    data: dict[str, Any] = dataclasses.field(metadata={"max": 256})  # its members become the JWS's claims
    lifetime: int | None = None


def encrypt_data(context: Context, given: PersonalDataInput) -> dict[str, Any]:
    core, bank = context.core, context.core.bank(context.bank_name)
    recipient = core.banks.jwks(bank.name).encryption_key()
    key = _signing_key(context)
    token = encrypted_personal_data(core.signer, core.config, key, client_id=_client_id(context),
                                    issuer=bank.issuer, recipient=recipient, data=given.data,
                                    lifetime=given.lifetime)
    return {"bank": bank.name, "kid": key.kid, "recipient_kid": recipient.get("kid"), "jwe": token}


@dataclasses.dataclass(frozen=True)
class EventInput:
    """``jwe``: the body the bank POSTed to the webhook; ``content_type``: its Content-Type, if at hand."""

    jwe: str = text(MAX_SIZE)
    content_type: str | None = text(128, None)


def receive_event(context: Context, given: EventInput) -> dict[str, Any]:
    core, bank = context.core, context.core.bank(context.bank_name)
    alias = _encryption_key(context)
    receiver = EventReceiver(bank=bank.name, issuer=bank.issuer, client_id=_client_id(context),
                             jwks=core.banks.jwks(bank.name), recipients=_recipients(context, alias),
                             replay=core.banks.replay(bank.name))
    event = receiver.receive(given.jwe.encode("ascii", "replace"), given.content_type)
    context.log["event_type"] = event.event_type
    context.log["decrypted_with"] = event.decrypted_with
    return event.as_dict()


def _recipients(context: Context, alias: str) -> list[jwe.Recipient]:
    """The alias's keys that decrypt (a rotation's current and successor, its retired ones not removed from this
    host's token), each by the kid it is published under; each unwraps with its own key, so the audit trail
    names the key that was used."""
    core = context.core
    names = core.rotation.decrypting(alias)
    found = [jose.resolve(core.keys, core.config, names[0], policy_of=alias)]  # the current key: it must be here
    found += [key for name in names[1:] if (key := resolved(core.keys, core.config, name, policy_of=alias))]
    return [jwe.Recipient(key.kid, functools.partial(core.signer.decrypt_oaep_sha256, key.signer)) for key in found]


def _client_id(context: Context) -> str:
    configured = context.core.sections.tokens.client_id
    return configured or context.core.banks.tokens(context.bank_name).client_id


def _signing_key(context: Context) -> jose.JoseKey:
    """``[tokens] signing_key``, a jws key (agent.sections refuses any other purpose at load)."""
    core = context.core
    return jose.resolve(core.keys, core.config, core.sections.tokens.signing_key)


def _encryption_key(context: Context) -> str:
    """The alias of ``[tokens] encryption_key``, which must be configured with purpose ``encryption``."""
    name = context.core.sections.tokens.encryption_key
    found = context.core.config.key_named(name)
    if found is None:
        raise UnknownKeyError(f"no encryption key {name!r} is configured: the bank's events cannot be decrypted",
                              hint=f"add [keys.{name}] with purpose = \"encryption\" (made with `tpp-agent keys "
                                   "generate --purpose encryption`), or set [tokens] encryption_key")
    if found.purpose is not KeyPurpose.ENCRYPTION:
        raise KeyPurposeError(f"key {found.alias!r} is a {found.purpose} key, not an encryption key")
    return found.alias


def _kid_of(token: str) -> str:
    try:
        kid = unverified_header(token.strip()).get("kid")
    except AgentError:
        return "-"
    return kid if isinstance(kid, str) else "-"


def _record_check(context: Context, kid: str, token: str, result: str) -> None:
    """The verification in the audit trail: the bank's key (by bank and kid), the JWS's hash, the outcome."""
    caller = current_caller("a verification of the bank's JWS")
    context.core.signer.audit.record(KeyUse(caller.uid, caller.pid, f"bank:{context.bank_name}#{kid[:128]}",
                                            caller.operation, "PS256", token.encode("utf-8", "replace"), result,
                                            caller.interaction_id))


SPECS: tuple[Spec[Any], ...] = (
    Spec("verify", Operation.VERIFY, "verify a JWS the bank signed (PS256, its JWKS, iss/aud/exp/nbf)",
         Resource.BANK, VerifyInput, verify, calls_bank=True, result=VerifiedAnswer),
    Spec("signed_body", Operation.SIGNED_BODY, "sign a request body as a JWT (application/jwt)", Resource.BANK,
         SignedBodyInput, sign_body, result=SignedBodyAnswer),
    Spec("encrypt_personal_data", Operation.ENCRYPT_PERSONAL_DATA,
         "sign personal data and encrypt it to the bank's encryption key (JWS in JWE)", Resource.BANK,
         PersonalDataInput, encrypt_data, calls_bank=True, result=PersonalDataAnswer),
    Spec("receive_event", Operation.RECEIVE_EVENT, "decrypt and verify an event the bank sent (JWE, JWS, jti)",
         Resource.BANK, EventInput, receive_event, calls_bank=True, result=BankEvent),
)
