"""JWK and JWKS (RFC 7517) of token keys, as a bank or the directory fetches them."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from agent.config import Config, KeyPurpose
from agent.jose.errors import JoseError
from agent.jose.keys import JoseKey, cert_thumbprint, resolve
from pkcs11_backends.keys import KeyStore

ENCRYPTION_ALGORITHM = "RSA-OAEP-256"  # JWE key management: what a bank encrypts to an encryption key with


def to_jwk(key: JoseKey, purpose: KeyPurpose = KeyPurpose.JWS) -> dict[str, Any]:
    """The public JWK with ``kid``, ``use``, ``alg`` and, when the token holds a certificate, ``x5c``/``x5t#S256``.

    A jws key is ``use: sig`` with its first algorithm; an encryption key ``use: enc``, ``alg: RSA-OAEP-256``:
    a bank encrypts events to it and never verifies with it.
    """
    if purpose is KeyPurpose.ENCRYPTION:
        if key.public_jwk["kty"] != "RSA":
            raise JoseError(f"encryption key {key.name!r} is not RSA: JWE RSA-OAEP-256 needs an RSA key",
                            hint="make it with `tpp-agent keys generate --purpose encryption --type rsa:2048`")
        use, alg = "enc", ENCRYPTION_ALGORITHM
    else:
        use, alg = "sig", key.algorithms[0]
    jwk: dict[str, Any] = {**key.public_jwk, "kid": key.kid, "use": use, "alg": alg}
    if key.certificate is not None:
        # x5c is standard base64 (RFC 7517 §4.7), unlike every other binary JOSE member.
        jwk["x5c"] = [base64.b64encode(key.certificate.der).decode("ascii")]
        jwk["x5t#S256"] = cert_thumbprint(key.certificate.der)
    return jwk


def jwks(store: KeyStore, config: Config, names: Sequence[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """A JWK Set of the named keys (encryption keys as ``use: enc``); with no names, of every key configured
    under ``[keys]``."""
    chosen = list(names) or list(config.keys)
    if not chosen:
        raise JoseError("no keys named and none configured", hint="pass --key KEY or add [keys.ALIAS] sections")
    return {"keys": [to_jwk(resolve(store, config, name), _purpose(config, name)) for name in chosen]}


def _purpose(config: Config, name: str) -> KeyPurpose:
    found = config.key_named(name)
    return found.purpose if found is not None and found.purpose is not None else KeyPurpose.JWS
