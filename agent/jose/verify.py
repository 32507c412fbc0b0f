"""Verifying a compact JWS a bank signed (its answers, id_tokens, events): sans-I/O, on jwcrypto.

    verified = verify_jws(token, keys.signing_key, issuer=bank_issuer, audience=client_id)
    verified.header, verified.claims

The checks, in order, each with its own error class (``agent.jose.errors``): the form (:class:`MalformedError`),
``alg`` exactly PS256 (:class:`AlgorithmRefusedError`, checked before any key is looked at, so ``none``, HS256 or a
downgrade never reach a verifier), the ``kid`` among the bank's keys (:class:`UnknownKidError`, raised by the key
lookup), the signature (:class:`SignatureInvalidError`), then the claims (``iss``, ``aud``, ``exp``, ``nbf``,
``iat``: :class:`ClaimRejectedError` subclasses). ``leeway`` (default 10 s, the ecosystem's skew) applies to every
time check.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jws as jwcrypto_jws

from agent import strict_json
from agent.jose.encoding import b64url_decode
from agent.jose.errors import (
    AlgorithmRefusedError,
    ClaimRejectedError,
    ExpiredError,
    MalformedError,
    NotYetValidError,
    SignatureInvalidError,
    UnknownKidError,
    WrongAudienceError,
    WrongIssuerError,
)

ALGORITHM = "PS256"
LEEWAY = 10
MAX_SIZE = 1 << 20  # a compact JWS larger than this is refused before it is parsed
KeyLookup = Callable[[str], jwcrypto_jwk.JWK]
_COMPACT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]*)+")


@dataclasses.dataclass(frozen=True)
class Verified:
    header: dict[str, Any]
    claims: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"header": self.header, "claims": self.claims}


def unverified_header(token: str, what: str = "JWS") -> dict[str, Any]:
    """The protected header of a compact JWS or JWE, parsed but not trusted.

    Only the compact form: base64url parts separated by dots. (Python's base64 decoder skips characters outside
    its alphabet, and jwcrypto also reads the JSON form: neither may decide what a token says.)
    """
    if not isinstance(token, str) or len(token) > MAX_SIZE or not _COMPACT.fullmatch(token):
        raise MalformedError(f"{what}: not a compact serialisation (base64url parts and dots, at most "
                             f"{MAX_SIZE} bytes)")
    return _json_object(token.split(".", 1)[0], f"{what} header")


def verify_jws(token: str, key_for: KeyLookup, *, issuer: str | None, audience: str | None,
               now: float | None = None, leeway: int = LEEWAY, require: Sequence[str] = ("exp",),
               what: str = "JWS") -> Verified:
    """Header and claims of ``token`` once signature and claims pass; ``key_for(kid)`` gives the bank's key.

    ``issuer``/``audience`` None skip that check (an API whose answers carry no ``aud``); ``require`` lists the
    claims that must be present (``iss``/``aud`` are required whenever they are checked).
    """
    header = unverified_header(token, what)
    if token.count(".") != 2:
        raise MalformedError(f"{what}: a compact JWS has three dot-separated parts")
    if header.get("alg") != ALGORITHM:
        raise AlgorithmRefusedError(f"{what}: alg is {header.get('alg')!r}; only {ALGORITHM} is accepted")
    if "crit" in header or "b64" in header:
        # No extension is understood here; b64=false would also make the signed payload differ from the parsed one.
        raise MalformedError(f"{what}: crit and b64 header members are not accepted")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise UnknownKidError(f"{what}: the header has no kid, so no key of the bank can be chosen")
    key = key_for(kid)
    checker = jwcrypto_jws.JWS()
    checker.allowed_algs = [ALGORITHM]
    try:
        checker.deserialize(token)
        checker.verify(key, alg=ALGORITHM)
    except jwcrypto_jws.InvalidJWSSignature:
        raise SignatureInvalidError(f"{what}: the signature does not verify with the bank's key {kid!r}") from None
    except (jwcrypto_jws.InvalidJWSObject, jwcrypto_jws.InvalidJWSOperation, ValueError) as exc:
        raise MalformedError(f"{what}: {exc}") from None
    claims = _json_object(token.split(".")[1], f"{what} payload")
    check_claims(claims, issuer=issuer, audience=audience, now=now, leeway=leeway, require=require, what=what)
    return Verified(header, claims)


def check_claims(claims: Mapping[str, Any], *, issuer: str | None, audience: str | None, now: float | None = None,
                 leeway: int = LEEWAY, require: Sequence[str] = ("exp",), what: str = "JWS") -> None:
    """The registered claims (RFC 7519 §4.1) of an already verified payload."""
    moment = time.time() if now is None else now
    for name in require:
        if name not in claims:
            raise ClaimRejectedError(f"{what}: claim {name!r} is required")
    if issuer is not None and claims.get("iss") != issuer:
        raise WrongIssuerError(f"{what}: iss is {claims.get('iss')!r}, expected {issuer!r}")
    if audience is not None:
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if audience not in audiences:
            raise WrongAudienceError(f"{what}: aud {aud!r} does not contain {audience!r}")
    times = {name: claims[name] for name in ("exp", "nbf", "iat") if name in claims}
    for name, value in times.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ClaimRejectedError(f"{what}: claim {name!r} must be a NumericDate")
    if "exp" in times and moment > times["exp"] + leeway:
        raise ExpiredError(f"{what}: expired {int(moment - times['exp'])} s ago (exp {int(times['exp'])})")
    for name in ("nbf", "iat"):
        if name in times and times[name] > moment + leeway:
            raise NotYetValidError(f"{what}: {name} is {int(times[name] - moment)} s in the future")


def _json_object(part: str, what: str) -> dict[str, Any]:
    try:
        value = strict_json.loads(b64url_decode(part))
    except (ValueError, TypeError):
        raise MalformedError(f"{what} is not base64url-encoded JSON") from None
    if not isinstance(value, dict):
        raise MalformedError(f"{what} is not a JSON object")
    return value
