"""Generic JWS over the caller's payload, fenced off from what the typed operations sign.

A client assertion or a request object for a bank is the agent's own word to that bank: the generic ``jws``
operation refuses a payload shaped like one (the configured client id as ``iss``, ``sub`` or ``client_id``,
and ``aud`` one of a bank's issuer or endpoints) unless the caller holds that typed operation for that bank.
The caller may set only the protected header members of :data:`ALLOWED_HEADERS` (never ``kid``, ``x5t``,
``jku``, ``crit``, ``b64``, ``zip``… nor ``alg`` in any spelling: the agent sets those), and an ``exp`` at most
``[jose] jws_max_lifetime`` seconds ahead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any, TypedDict

from agent import jose, strict_json
from agent.config import KeyPurpose
from agent.errors import AgentError
from agent.jose import ClaimsError, JoseError
from agent.jose.encoding import compact_json
from agent.openfinance.discovery import ENDPOINTS
from agent.operations.core import Context
from agent.operations.errors import PolicyDenied
from agent.operations.inputs import InvalidInput, base64_bytes, text
from agent.operations.spec import Operation, Resource, Spec
from pkcs11_backends.errors import Pkcs11Error

MAX_PAYLOAD_BYTES = 256 << 10
ALLOWED_HEADERS = frozenset({"typ", "cty", "iat", "iss", "tan", "http://openbanking.org.uk/iat",
                             "http://openbanking.org.uk/iss", "http://openbanking.org.uk/tan"})
_REQUEST_OBJECT_CLAIMS = frozenset({"response_type", "redirect_uri", "code_challenge", "authorization_details"})


@dataclasses.dataclass(frozen=True)
class JwsInput:
    payload: dict[str, Any] | None = None
    payload_b64: bytes | None = base64_bytes(MAX_PAYLOAD_BYTES, None)
    alg: str | None = text(16, None)
    header: dict[str, Any] | None = dataclasses.field(default=None, metadata={"max": 16})

    def check(self) -> None:
        if (self.payload is None) == (self.payload_b64 is None):
            raise InvalidInput("missing_field",
                               "give exactly one of 'payload_b64' (bytes) or 'payload' (JSON object)")


class JwsAnswer(TypedDict):
    key: str
    kid: str
    alg: str
    jws: str


def sign_jws(context: Context, given: JwsInput) -> dict[str, Any]:
    payload = compact_json(given.payload) if given.payload is not None else given.payload_b64 or b""
    header = dict(given.header or {})
    refused = sorted(name for name in header if name not in ALLOWED_HEADERS)
    if refused:
        raise JoseError(f"header member {refused[0][:40]!r} may not be set by the caller",
                        hint=f"allowed: {', '.join(sorted(ALLOWED_HEADERS))}; alg and kid come from the key")
    claims = _claims(payload)
    if claims is not None:
        _check_lifetime(context, claims)
        _check_not_typed(context, claims)
    core = context.core
    key = jose.resolve(core.keys, core.config, context.key_config.alias)
    context.log["alg"] = given.alg or key.algorithms[0]
    signed = jose.sign_jws(core.signer, core.config, key, payload, alg=given.alg, header=header or None)
    return {"key": key.name, "kid": key.kid, "alg": given.alg or key.algorithms[0], "jws": signed}


def _claims(payload: bytes) -> dict[str, Any] | None:
    """The payload as a JSON object when it is one (a JWT's claims, checked before they are signed), else None.

    Bytes that start like an object (after whitespace or a UTF-8 BOM) but are not strict JSON are refused, not
    signed as they are: a lenient parser at a bank (comments, single quotes, a trailing comma, the first of two
    members with one name) could read claims out of them that were never checked here.
    """
    if not payload.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
        return None
    try:
        value = strict_json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput("bad_json", f"the payload starts like a JSON object but is not strict JSON: {exc}",
                           "send the claims as one JSON object (RFC 8259), each member name once") from None
    return value if isinstance(value, dict) else None


def _check_lifetime(context: Context, claims: dict[str, Any]) -> None:
    if "exp" not in claims:
        return
    exp, limit = claims["exp"], context.core.sections.jose.jws_max_lifetime
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise ClaimsError("claim 'exp' must be a NumericDate (seconds since the epoch)")
    if exp - time.time() > limit:
        raise ClaimsError(f"claim 'exp' is {int(exp - time.time())} s ahead, more than the {limit} s allowed",
                          hint="ask for a shorter lifetime, or raise [jose] jws_max_lifetime")


def _check_not_typed(context: Context, claims: dict[str, Any]) -> None:
    """Refuse a client assertion or a request object for a bank the caller holds no such grant for."""
    audiences = _strings(claims.get("aud"))
    if not audiences:
        return
    identities = {v for name in ("iss", "sub", "client_id") for v in _strings(claims.get(name))}
    for bank, targets in _bank_audiences(context):
        if not audiences & targets:
            continue
        known = _client_ids(context)
        if known is not None and not identities & known:
            continue
        typed = Operation.PAR if _REQUEST_OBJECT_CLAIMS & claims.keys() else Operation.CLIENT_ASSERTION
        if not context.grants.allows(typed, bank=bank):
            what = "a request object" if typed is Operation.PAR else "a client assertion"
            raise PolicyDenied(f"the payload is shaped like {what} for bank {bank!r} (the agent's client id, "
                               f"aud {sorted(audiences & targets)[0]!r}): the jws operation does not sign those",
                               hint=f"use the {typed.value} operation, which a [policy.rules.*] entry must grant "
                                    f"for bank {bank!r}")


def _strings(value: object) -> set[str]:
    items = value if isinstance(value, list) else [value]
    return {item.rstrip("/") for item in items if isinstance(item, str)}


def _bank_audiences(context: Context) -> Iterator[tuple[str, set[str]]]:
    for name, bank in context.core.sections.banks.items():
        targets = {bank.issuer.rstrip("/")}
        cached = context.core.banks.discovery(name).cached()
        if cached is not None:
            document = cached.document
            aliases = document.get("mtls_endpoint_aliases")
            for source in (document, aliases if isinstance(aliases, dict) else {}):
                targets |= _strings([source.get(endpoint) for endpoint in ENDPOINTS])
            targets |= _strings(document.get("issuer"))
        yield name, targets


def _client_ids(context: Context) -> set[str] | None:
    """The client ids the agent signs as: ``[tokens] client_id``, else each bank's transport certificate CN;
    None when one cannot be read (then any identity counts as the agent's: refusing is the safe side)."""
    configured = context.core.sections.tokens.client_id
    if configured:
        return {configured}
    found = set()
    for bank in context.core.sections.banks.values():
        try:
            certificate = context.core.keys.info(bank.tls.client_key).certificate
        except (AgentError, Pkcs11Error):
            return None
        common_name = certificate.parsed.subject.native.get("common_name") if certificate is not None else None
        if not isinstance(common_name, str):
            return None
        found.add(common_name)
    return found


SPECS: tuple[Spec[Any], ...] = (
    Spec("jws", Operation.JWS, "a compact JWS over the caller's payload", Resource.KEY, JwsInput, sign_jws,
         purposes=frozenset({KeyPurpose.JWS}), result=JwsAnswer),
)
