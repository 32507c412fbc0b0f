"""What a TPP sends a bank in a body: signed request bodies (``application/jwt``) and encrypted personal data.

* :func:`signed_body` — payments, Confirmation of Payee, insurance policies…: a PS256 JWT signed on the token with
  ``iss`` = client_id, ``aud`` (the issuer: a string in some APIs, an array in others — the caller says which),
  ``iat``, ``nbf``, ``exp``, ``jti`` and the payload under ``message`` (``{"message": {"Data": …}}``).
* :func:`encrypted_personal_data` — personal data in a PAR consent or a payment: a PS256 JWS (``iss`` = ``sub`` =
  client_id, ``aud`` = issuer, ``iat``, ``exp``, ``jti``) signed on the token, nested in a JWE (RSA-OAEP-256,
  A256GCM, ``cty: JWT``) to the bank's ``use: enc`` key.
* :func:`check_idempotency_key` — the ``x-idempotency-key`` rules (≤ 40 characters, no whitespace).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from jwcrypto import jwk as jwcrypto_jwk

from agent.config import Config
from agent.errors import InputError
from agent.jose import jwe
from agent.jose.assertions import JoseSettings
from agent.jose.errors import ClaimsError
from agent.jose.jws import sign_claims
from agent.jose.keys import JoseKey
from pkcs11_backends.keys import KeyStore

CONTENT_TYPE = "application/jwt"
MAX_IDEMPOTENCY_KEY = 40
_REGISTERED = frozenset({"iss", "sub", "aud", "iat", "nbf", "exp", "jti"})


def signed_body(store: KeyStore, config: Config, key: str | JoseKey, *, client_id: str, audience: str | Sequence[str],
                message: Mapping[str, Any], lifetime: int | None = None, now: float | None = None) -> str:
    """A signed request body; ``audience`` as the API wants it (a list gives a JSON array)."""
    if not isinstance(message, Mapping):
        raise ClaimsError("a signed body's message must be a JSON object, e.g. {\"Data\": {…}}")
    _json(message, "message")
    claims = {**_registered(client_id, _audience(audience), config, lifetime, now), "message": dict(message)}
    return sign_claims(store, config, key, claims)


def encrypted_personal_data(store: KeyStore, config: Config, key: str | JoseKey, *, client_id: str, issuer: str,
                            recipient: jwcrypto_jwk.JWK, data: Mapping[str, Any], lifetime: int | None = None,
                            now: float | None = None) -> str:
    """``data`` (its members become claims) signed on the token, then encrypted to the bank's key ``recipient``."""
    if not isinstance(data, Mapping) or not data:
        raise ClaimsError("personal data must be a non-empty JSON object")
    clash = sorted(_REGISTERED & set(data))
    if clash:
        raise ClaimsError(f"personal data may not set {', '.join(clash)}: the agent sets the registered claims")
    _json(data, "personal data")
    claims = {**dict(data), **_registered(client_id, issuer, config, lifetime, now), "sub": client_id}
    claims.pop("nbf")  # the profile lists iss, sub, aud, iat, exp, jti for this JWS
    signed = sign_claims(store, config, key, claims)
    return jwe.encrypt(signed.encode("ascii"), recipient, header={"cty": "JWT"})


def check_idempotency_key(value: str) -> str:
    """``x-idempotency-key`` as the caller gave it (sent unchanged on a retry), if it keeps the rules."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_IDEMPOTENCY_KEY \
            or any(c.isspace() for c in value) or not value.isprintable():
        raise InputError(f"x-idempotency-key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters without "
                         "whitespace", hint="reuse the same key when retrying the same payment; a new one otherwise")
    return value


def _registered(client_id: str, audience: str | list[str], config: Config, lifetime: int | None,
                now: float | None) -> dict[str, Any]:
    settings = JoseSettings.from_config(config)
    life = settings.assertion_lifetime if lifetime is None else lifetime
    if isinstance(life, bool) or not isinstance(life, int) or not 0 < life <= settings.assertion_lifetime:
        raise ClaimsError(f"lifetime must be 1 to {settings.assertion_lifetime} s")
    if not isinstance(client_id, str) or not client_id:
        raise ClaimsError("client_id is required")
    iat = int(time.time() if now is None else now)
    return {"iss": client_id, "aud": audience, "iat": iat, "nbf": iat - settings.nbf_skew, "exp": iat + life,
            "jti": str(uuid.uuid4())}


def _audience(audience: str | Sequence[str]) -> str | list[str]:
    if isinstance(audience, str):
        if not audience:
            raise ClaimsError("aud must not be empty")
        return audience
    values = list(audience)
    if not values or not all(isinstance(a, str) and a for a in values):
        raise ClaimsError("aud must be a non-empty string or a non-empty list of them")
    return values


def _json(value: Mapping[str, Any], what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ClaimsError(f"{what} is not plain JSON ({exc}): NaN, Infinity and non-JSON values are refused") \
            from None
