"""Client assertions (``private_key_jwt``, RFC 7523) and PAR request objects (RFC 9126/9101), signed on the token.

The claims are built, then checked against the ecosystem's rules, and only then signed: a JWT a strict bank must
refuse is never produced.

Clock skew: ``iat`` is this host's clock (keep it NTP-synchronised). Banks accept ``iat``/``nbf`` up to 10 s in
their future, and an assertion lives at most 300 s, so a host clock a few seconds *ahead* of the bank is tolerated by
the bank; a clock *behind* the bank shortens the usable lifetime by that much. ``nbf`` is set ``nbf_skew`` seconds
(default 10) before ``iat`` so that a bank whose clock is slightly behind ours does not see the JWT as not yet valid.
Lifetimes are measured from ``iat`` (client assertions: ``exp - iat`` ≤ 300 s) and, for request objects, the rule
``exp - nbf`` ≤ 600 s is checked on the final claims, backdated ``nbf`` included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from agent.config import Config
from agent.jose.encoding import b64url
from agent.jose.errors import ClaimsError, JoseError
from agent.jose.jws import sign_claims
from agent.jose.keys import JoseKey
from pkcs11_backends.keys import KeyStore

MAX_ASSERTION_LIFETIME = 300
MAX_REQUEST_OBJECT_WINDOW = 600  # exp - nbf
MAX_NBF_SKEW = 60
DEFAULT_JWS_MAX_LIFETIME = 600
MAX_JWS_LIFETIME = 86400
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_PKCE_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_PROMPTS = frozenset({"none", "login", "consent", "select_account"})


@dataclasses.dataclass(frozen=True)
class JoseSettings:
    """``[jose]``: lifetimes and skew. Limits can be set lower than the ecosystem's, never higher."""

    assertion_lifetime: int = MAX_ASSERTION_LIFETIME
    request_object_lifetime: int = 300
    nbf_skew: int = 10
    assertion_nbf: bool = True
    jws_max_lifetime: int = DEFAULT_JWS_MAX_LIFETIME  # a caller's JWS (POST /v1/keys/ALIAS/jws): exp - now at most

    @classmethod
    def from_config(cls, config: Config) -> JoseSettings:
        raw = dict(config.section("jose"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise JoseError(f"unknown setting(s) {', '.join(unknown)} in [jose]",
                            hint=f"known settings: {', '.join(sorted(known))}")
        settings = cls(**raw)
        bounds = {"assertion_lifetime": (1, MAX_ASSERTION_LIFETIME), "nbf_skew": (0, MAX_NBF_SKEW),
                  "request_object_lifetime": (1, MAX_REQUEST_OBJECT_WINDOW - settings.nbf_skew),
                  "jws_max_lifetime": (1, MAX_JWS_LIFETIME)}
        for name, (low, high) in bounds.items():
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise JoseError(f"[jose] {name} must be an integer from {low} to {high}",
                                hint="request_object_lifetime + nbf_skew must stay within 600 s")
        if not isinstance(settings.assertion_nbf, bool):
            raise JoseError("[jose] assertion_nbf must be true or false")
        return settings


# -- client assertions ----------------------------------------------------------

def client_assertion_claims(client_id: str, audience: str, settings: JoseSettings, *, lifetime: int | None = None,
                            now: float | None = None) -> dict[str, Any]:
    """Fresh claims: ``iss`` = ``sub`` = client_id, ``aud`` = the bank's issuer, a new UUIDv4 ``jti``."""
    iat = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iss": client_id, "sub": client_id, "aud": audience, "jti": str(uuid.uuid4()),
                              "iat": iat, "exp": iat + (settings.assertion_lifetime if lifetime is None else lifetime)}
    if settings.assertion_nbf:
        claims["nbf"] = iat - settings.nbf_skew
    return claims


def check_client_assertion(claims: Mapping[str, Any], max_lifetime: int = MAX_ASSERTION_LIFETIME) -> None:
    """Refuse claims a strict bank would refuse (ClaimsError names the first broken rule)."""
    client_id = _text(claims, "iss")
    if _text(claims, "sub") != client_id:
        raise ClaimsError("client assertion: sub must equal iss (both the client_id)")
    _text(claims, "aud")
    _text(claims, "jti")
    iat, exp = _time(claims, "iat"), _time(claims, "exp")
    if not 0 < exp - iat <= max_lifetime:
        raise ClaimsError(f"client assertion: exp - iat is {exp - iat} s; it must be 1 to {max_lifetime} s")
    if "nbf" in claims and _time(claims, "nbf") > iat:
        raise ClaimsError("client assertion: nbf must not be after iat")


def client_assertion(store: KeyStore, config: Config, key: str | JoseKey, client_id: str, audience: str, *,
                     lifetime: int | None = None) -> str:
    """A signed client assertion for the bank whose issuer is ``audience``."""
    settings = JoseSettings.from_config(config)
    claims = client_assertion_claims(client_id, audience, settings, lifetime=lifetime)
    check_client_assertion(claims, settings.assertion_lifetime)
    return sign_claims(store, config, key, claims)


# -- PAR request objects --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AuthorizationRequest:
    """A signed request object and the secrets the caller keeps for the redirect back."""

    request: str
    code_verifier: str
    state: str
    nonce: str | None  # None without scope openid: nonce is an OpenID Connect parameter
    claims: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge) per RFC 7636: 32 random bytes → 43 characters."""
    verifier = b64url(secrets.token_bytes(32))
    return verifier, b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def request_object_claims(client_id: str, audience: str, settings: JoseSettings, *, scope: str, redirect_uri: str,
                          code_challenge: str, state: str, nonce: str | None,
                          authorization_details: Sequence[Mapping[str, Any]] | None = None,
                          parameters: Mapping[str, Any] | None = None,
                          lifetime: int | None = None, now: float | None = None) -> dict[str, Any]:
    iat = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": client_id, "aud": audience, "client_id": client_id, "iat": iat, "nbf": iat - settings.nbf_skew,
        "exp": iat + (settings.request_object_lifetime if lifetime is None else lifetime), "jti": str(uuid.uuid4()),
        "response_type": "code", "scope": scope, "redirect_uri": redirect_uri, "state": state,
        "code_challenge": code_challenge, "code_challenge_method": "S256",
    }
    if nonce is not None:
        claims["nonce"] = nonce
    if authorization_details is not None:
        claims["authorization_details"] = [dict(d) for d in authorization_details]
    check_authorization_parameters(parameters or {})
    claims.update(parameters or {})
    return claims


def check_authorization_parameters(parameters: Mapping[str, Any]) -> None:
    """The optional request parameters a bank may require, each of the type its standard gives.

    ``resource`` (RFC 8707: an absolute URI or a list of them), ``prompt`` (OIDC: space-separated none, login,
    consent, select_account), ``max_age`` (seconds), ``acr_values`` (space-separated), ``claims`` (OIDC §5.5 object).
    """
    unknown = sorted(set(parameters) - set(AUTHORIZATION_PARAMETERS))
    if unknown:
        raise ClaimsError(f"request object: unknown parameter(s) {', '.join(unknown)}",
                          hint=f"the optional parameters are {', '.join(AUTHORIZATION_PARAMETERS)}")
    for name, value in parameters.items():
        if not AUTHORIZATION_PARAMETERS[name](value):
            raise ClaimsError(f"request object: {name} has the wrong form: {_PARAMETER_FORMS[name]}")


def _absolute_uri(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return bool(parts.scheme and parts.netloc and not parts.fragment)


def _words(value: Any, allowed: frozenset[str] | None = None) -> bool:
    words = value.split() if isinstance(value, str) else []
    return bool(words) and (allowed is None or set(words) <= allowed)


AUTHORIZATION_PARAMETERS: dict[str, Any] = {
    "resource": lambda v: _absolute_uri(v) or (isinstance(v, list) and bool(v) and all(map(_absolute_uri, v))),
    "prompt": lambda v: _words(v, _PROMPTS) and ("none" not in v.split() or v.strip() == "none"),
    "max_age": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**9,
    "acr_values": _words,
    "claims": lambda v: isinstance(v, dict) and set(v) <= {"id_token", "userinfo"}
                        and all(isinstance(x, dict) for x in v.values()),
}
_PARAMETER_FORMS = {
    "resource": "an absolute URI without a fragment, or a non-empty list of them",
    "prompt": "space-separated values from none, login, consent, select_account (none alone)",
    "max_age": "a whole number of seconds, 0 or more",
    "acr_values": "space-separated values",
    "claims": "an object with id_token and/or userinfo objects (OpenID Connect Core §5.5)",
}


def check_request_object(claims: Mapping[str, Any]) -> None:
    _text(claims, "aud")
    if claims.get("client_id", claims.get("iss")) != _text(claims, "iss"):
        raise ClaimsError("request object: client_id must equal iss")
    iat, nbf, exp = _time(claims, "iat"), _time(claims, "nbf"), _time(claims, "exp")
    if nbf > iat:
        raise ClaimsError("request object: nbf must not be after iat")
    if exp <= iat or exp - nbf > MAX_REQUEST_OBJECT_WINDOW:
        raise ClaimsError(f"request object: exp - nbf is {exp - nbf} s; it must be at most "
                          f"{MAX_REQUEST_OBJECT_WINDOW} s, with exp after iat")
    if claims.get("response_type") != "code":
        raise ClaimsError("request object: response_type must be \"code\"")
    if not _text(claims, "scope").strip():
        raise ClaimsError("request object: scope must not be blank")
    target = urlsplit(_text(claims, "redirect_uri"))
    if target.scheme != "https" or not target.netloc or target.fragment:
        raise ClaimsError("request object: redirect_uri must be an absolute https URL without a fragment")
    # nonce is OpenID Connect's (Core §3.1.2.1), required there for replay protection of the id_token; in a
    # plain OAuth request it has no meaning and servers refuse it (oidc-provider: "openid scope must be
    # requested when using the nonce parameter").
    if "openid" in _text(claims, "scope").split():
        _text(claims, "nonce")
    elif "nonce" in claims:
        raise ClaimsError("request object: nonce is an OpenID Connect parameter: add openid to the scope, or "
                          "leave nonce out")
    _text(claims, "state")
    if claims.get("code_challenge_method") != "S256" or not _PKCE_CHALLENGE.match(_text(claims, "code_challenge")):
        raise ClaimsError("request object: PKCE needs code_challenge_method S256 and a 43-character code_challenge")
    details = claims.get("authorization_details")
    if details is not None and (not isinstance(details, list) or not details or
                                not all(isinstance(d, dict) and isinstance(d.get("type"), str) for d in details)):
        raise ClaimsError("request object: authorization_details must be a non-empty list of objects with a type")


def request_object(store: KeyStore, config: Config, key: str | JoseKey, client_id: str, audience: str, *,
                   scope: str, redirect_uri: str, authorization_details: Sequence[Mapping[str, Any]] | None = None,
                   state: str | None = None, nonce: str | None = None,
                   parameters: Mapping[str, Any] | None = None,
                   lifetime: int | None = None) -> AuthorizationRequest:
    """A signed request object for PAR; the PKCE verifier (and state, nonce) go back to the caller only."""
    settings = JoseSettings.from_config(config)
    verifier, challenge = pkce_pair()
    state = state or b64url(secrets.token_bytes(16))
    if "openid" in scope.split():
        nonce = nonce or b64url(secrets.token_bytes(16))
    claims = request_object_claims(client_id, audience, settings, scope=scope, redirect_uri=redirect_uri,
                                   code_challenge=challenge, state=state, nonce=nonce,
                                   authorization_details=authorization_details, parameters=parameters,
                                   lifetime=lifetime)
    check_request_object(claims)
    signed = sign_claims(store, config, key, claims, header={"typ": "oauth-authz-req+jwt"})
    return AuthorizationRequest(signed, verifier, state, nonce, claims)


def _text(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise ClaimsError(f"claim {name!r} is missing or not a non-empty string")
    return value


def _time(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClaimsError(f"claim {name!r} must be an integer NumericDate (seconds since the epoch)")
    return value
