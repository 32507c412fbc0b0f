"""JWK and JWKS (RFC 7517) of token keys, as a bank or the directory fetches them."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from agent.config import Config
from agent.jose.errors import JoseError
from agent.jose.keys import JoseKey, cert_thumbprint, resolve
from pkcs11_backends.keys import KeyStore


def to_jwk(key: JoseKey) -> dict[str, Any]:
    """The public JWK with ``kid``, ``use``, ``alg`` and, when the token holds a certificate, ``x5c``/``x5t#S256``."""
    jwk: dict[str, Any] = {**key.public_jwk, "kid": key.kid, "use": "sig", "alg": key.algorithms[0]}
    if key.certificate is not None:
        # x5c is standard base64 (RFC 7517 §4.7), unlike every other binary JOSE member.
        jwk["x5c"] = [base64.b64encode(key.certificate.der).decode("ascii")]
        jwk["x5t#S256"] = cert_thumbprint(key.certificate.der)
    return jwk


def jwks(store: KeyStore, config: Config, names: Sequence[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """A JWK Set of the named keys; with no names, of every key configured under ``[keys]``."""
    chosen = list(names) or list(config.keys)
    if not chosen:
        raise JoseError("no keys named and none configured", hint="pass --key KEY or add [keys.ALIAS] sections")
    return {"keys": [to_jwk(resolve(store, config, name)) for name in chosen]}
