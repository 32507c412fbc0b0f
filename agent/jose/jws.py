"""Compact JWS (RFC 7515) whose signature is made on the token.

The signing input is built here; the token signs it through ``KeyStore.sign``: PS256 as RSA-PSS with SHA-256,
MGF1-SHA-256 and a 32-byte salt, ES256/ES384 as the raw ``r||s`` that PKCS#11 ECDSA returns (which is exactly the
JWS form), RS256 as PKCS#1 v1.5 only for keys whose configuration lists it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.config import Config
from agent.jose.encoding import b64url, compact_json
from agent.jose.errors import JoseError
from agent.jose.keys import JoseKey, resolve
from pkcs11_backends.keys import KeyStore

# The agent sets these itself; a caller could otherwise make the header lie about the signature.
_OWN_HEADERS = frozenset({"alg", "kid", "jwk", "jku", "x5u", "x5c"})


def sign_jws(store: KeyStore, config: Config, key: str | JoseKey, payload: bytes, *, alg: str | None = None,
             header: Mapping[str, Any] | None = None) -> str:
    """Sign ``payload`` with a token key and return the compact serialisation.

    ``key`` is a configured alias, a ``pkcs11:`` URI or an already resolved :class:`JoseKey`;
    ``alg`` defaults to the key's first allowed algorithm; ``header`` adds protected header members.
    """
    jose_key = key if isinstance(key, JoseKey) else resolve(store, config, key)
    scheme = jose_key.scheme(alg)
    extra = dict(header or {})
    clash = sorted(_OWN_HEADERS & extra.keys())
    if clash:
        raise JoseError(f"header member(s) {', '.join(clash)} are set by the agent, not the caller",
                        hint="drop them from the header; alg and kid come from the key's configuration")
    protected = {"alg": scheme.jose_name, "kid": jose_key.kid, **extra}
    signing_input = f"{b64url(compact_json(protected))}.{b64url(payload)}"
    # By the URI its kid was read under: a rotation's switch between the two would sign with the other key.
    signature = store.sign(jose_key.signer, signing_input.encode("ascii"), scheme)
    return f"{signing_input}.{b64url(signature)}"


def sign_claims(store: KeyStore, config: Config, key: str | JoseKey, claims: Mapping[str, Any], *,
                alg: str | None = None, header: Mapping[str, Any] | None = None) -> str:
    """A signed JWT: ``claims`` as compact JSON under a ``typ: JWT`` header (unless the header says otherwise)."""
    return sign_jws(store, config, key, compact_json(claims), alg=alg, header={"typ": "JWT", **(header or {})})
