"""Health, readiness and the configured keys: listing, public halves, the JWK Set, raw signatures."""

from __future__ import annotations

import base64
import dataclasses
import os
from typing import Annotated, Any, Literal, NotRequired, TypedDict

from asn1crypto import pem

from agent import jose
from agent.config import KeyPurpose
from agent.jose import AlgorithmNotAllowedError
from agent.operations.core import Context
from agent.operations.errors import KeyPurposeError, NotReadyError
from agent.operations.inputs import Nothing, base64_bytes, text
from agent.operations.spec import Access, Operation, Resource, Spec
from pkcs11_backends.keys import SignatureScheme
from pkcs11_backends.sessions import PoolState

MAX_SIGN_BYTES = 1 << 20
_PUBLISHED = frozenset({KeyPurpose.JWS, KeyPurpose.ENCRYPTION})  # what a JWKS holds


class HealthAnswer(TypedDict):
    status: Literal["alive"]
    pid: Annotated[int, "the serving process"]


class PoolHealth(TypedDict):
    state: PoolState
    detail: str
    recoveries: Annotated[int, "times the session pool re-initialised the module since start"]


class ReadyAnswer(TypedDict):
    """Ready. A caller that no [policy.rules.*] entry names learns no more than that."""

    ready: Literal[True]
    detail: NotRequired[str]
    keys: NotRequired[Annotated[list[str], "the configured key aliases"]]
    banks: NotRequired[Annotated[list[str], "the configured banks"]]
    config_file: NotRequired[Annotated[str | None, "the configuration file it serves (None: built-in defaults)"]]
    config_digest: NotRequired[Annotated[str, "of the configuration it serves: the CLI compares its own"]]
    pool: NotRequired[PoolHealth]


class CertificateInfo(TypedDict):
    """The certificate stored on the token next to the key."""

    label: str
    subject: str
    not_before: Annotated[str, "ISO 8601"]
    not_after: Annotated[str, "ISO 8601"]
    sha256: Annotated[str, "of the DER, hex"]


class KeyEntry(TypedDict):
    alias: str
    uri: Annotated[str, "the configured pkcs11: URI"]
    type: Annotated[str, "rsa:2048, ec:p256..."]
    algorithms: list[str]
    purpose: Annotated[str, "tls, jws, encryption or audit"]
    kid: str | None
    certificate: CertificateInfo | None
    label: Annotated[str, "CKA_LABEL on the token"]
    id: Annotated[str, "CKA_ID, hex"]
    token_uri: Annotated[str, "the pkcs11: URI of the object found on the token"]


class KeysAnswer(TypedDict):
    keys: list[KeyEntry]


class PemAnswer(TypedDict):
    pem: str


# Functional syntax: "x5t#S256" is no identifier.
Jwk = TypedDict("Jwk", {
    "kty": str, "kid": str, "use": Literal["sig", "enc"], "alg": str,
    "n": NotRequired[str], "e": NotRequired[str], "crv": NotRequired[str], "x": NotRequired[str],
    "y": NotRequired[str], "x5c": NotRequired[list[str]], "x5t#S256": NotRequired[str],
})


class JwkSet(TypedDict):
    keys: list[Jwk]


class SignAnswer(TypedDict):
    key: str
    kid: str | None
    alg: str
    signature_b64: Annotated[str, "the raw signature, base64"]


def health(context: Context, _: Nothing) -> dict[str, Any]:
    return {"status": "alive", "pid": os.getpid()}


def ready(context: Context, _: Nothing) -> dict[str, Any]:
    """Ready or not; a caller that no rule names learns nothing more (no key aliases, no token label).

    A named caller also learns what the agent serves: the CLI compares ``config_digest`` with its own
    configuration's (agent/cli/context.py), and ``tpp-agent status`` shows the session pool's health."""
    state = context.core.readiness()
    told = context.grants.named()
    if not state.ready:
        raise NotReadyError(f"not ready: {state.detail}" if told else "not ready")
    if not told:
        return {"ready": True}
    core = context.core
    pool = core.runtime.pool.health
    return {"ready": True, "detail": state.detail, "keys": sorted(core.config.keys),
            "banks": sorted(core.sections.banks),
            "config_file": str(core.config.path) if core.config.path else None, "config_digest": core.config.digest,
            "pool": {"state": pool.state.value, "detail": pool.detail, "recoveries": pool.recoveries}}


def list_keys(context: Context, _: Nothing) -> dict[str, Any]:
    result = []
    for alias in context.visible:
        key = context.core.config.keys[alias]
        info = context.core.keys.info(alias)
        result.append({"alias": alias, "uri": key.uri, "type": str(info.spec), "algorithms": list(key.algorithms),
                       "purpose": str(key.purpose), "kid": key.kid,
                       "certificate": info.certificate.as_dict() if info.certificate else None,
                       "label": info.label, "id": info.id.hex(), "token_uri": str(info.uri)})
    return {"keys": result}


@dataclasses.dataclass(frozen=True)
class PublicInput:
    format: Literal["pem", "jwk"] = text(8, "pem", doc="pem: SubjectPublicKeyInfo as PEM text; jwk: a jws key's JWK")


def public(context: Context, given: PublicInput) -> dict[str, Any]:
    """PEM SubjectPublicKeyInfo (any purpose: it is in the certificate anyway), or the JWK of a jws key."""
    alias = context.key_config.alias
    if given.format == "jwk":
        purpose = context.key_config.purpose
        if purpose not in _PUBLISHED:
            raise KeyPurposeError(f"key {alias!r} is a {purpose} key: it has no JWK (a JWK says what signs JWS, "
                                  "or what to encrypt to: only jws and encryption keys are published)")
        jwk: dict[str, Any] = jose.to_jwk(jose.resolve(context.core.keys, context.core.config, alias),
                                          purpose or KeyPurpose.JWS)
        return jwk
    spki = context.core.keys.public_key_info(alias)
    return {"pem": pem.armor("PUBLIC KEY", spki.dump()).decode("ascii")}


def jwks(context: Context, _: Nothing) -> dict[str, Any]:
    """The JWK Set of the jws (``use: sig``) and encryption (``use: enc``) keys the caller may see: never a tls
    or audit key."""
    core = context.core
    # In a rotation's overlap an alias has two keys: the banks must know the successor's kid before it signs.
    return {"keys": [jose.to_jwk(jose.resolve(core.keys, core.config, name, policy_of=alias),
                                 core.config.keys[alias].purpose or KeyPurpose.JWS)
                     for alias in context.visible for name in core.rotation.published(alias)]}


@dataclasses.dataclass(frozen=True)
class SignInput:
    alg: str = text(16)
    data_b64: bytes = base64_bytes(MAX_SIGN_BYTES)


def sign(context: Context, given: SignInput) -> dict[str, Any]:
    """A raw signature over the caller's bytes: only for a jws key that declares raw_sign = true."""
    key = context.key_config
    context.log["alg"] = given.alg
    if given.alg not in key.algorithms:
        raise AlgorithmNotAllowedError(
            f"key {key.alias!r} may sign with {', '.join(key.algorithms) or 'no algorithm'}, not {given.alg!r}",
            hint=f"add {given.alg!r} to [keys.{key.alias}] algorithms if this key should make {given.alg} signatures")
    signature = context.core.signer.sign(key.alias, given.data_b64, SignatureScheme.from_jose(given.alg))
    return {"key": key.alias, "kid": key.kid, "alg": given.alg,
            "signature_b64": base64.b64encode(signature).decode("ascii")}


SPECS: tuple[Spec[Any], ...] = (
    Spec("health", Operation.HEALTH, "the agent is alive", Resource.NONE, Nothing, health, access=Access.OPEN,
         result=HealthAnswer),
    Spec("ready", Operation.READY, "the token is logged in and the keys checked", Resource.NONE, Nothing, ready,
         access=Access.OPEN, result=ReadyAnswer),
    Spec("keys", Operation.KEYS, "the configured keys the caller may see", Resource.KEYS, Nothing, list_keys,
         purposes=frozenset(KeyPurpose), result=KeysAnswer),
    Spec("public", Operation.PUBLIC, "a key's public half (PEM, or the JWK of a jws key)", Resource.KEY,
         PublicInput, public, purposes=frozenset(KeyPurpose), result=PemAnswer | Jwk),
    Spec("jwks", Operation.PUBLIC, "the JWK Set of the jws and encryption keys the caller may see", Resource.KEYS,
         Nothing, jwks, purposes=_PUBLISHED, result=JwkSet),
    Spec("sign", Operation.SIGN, "a raw signature of the caller's bytes", Resource.KEY, SignInput, sign,
         purposes=frozenset({KeyPurpose.JWS}), raw_sign=True, result=SignAnswer),
)
