"""Which token key signs, with which algorithms, under which ``kid``.

Policy per key comes from ``[keys.ALIAS]``:

* ``algorithms``: the JWS algorithms the key may use. Unset, an RSA key may use PS256 only and an EC key the
  ES algorithm of its curve; RS256 is never allowed unless listed.
* ``kid``: ``"x5t#S256"`` (SHA-256 thumbprint of the certificate stored on the token with the key, the form the
  UAE directory shows), ``"thumbprint"`` (RFC 7638 JWK thumbprint) or any other literal value. Unset, the
  certificate thumbprint when the key has a certificate, else the JWK thumbprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from asn1crypto import keys as asn1_keys

from agent.config import Config, KeyConfig
from agent.errors import AgentError
from agent.jose.encoding import b64url, b64url_uint, compact_json
from agent.jose.errors import AlgorithmNotAllowedError, KidError
from pkcs11_backends.certificates import StoredCertificate
from pkcs11_backends.errors import Pkcs11Error
from pkcs11_backends.keys import Curve, KeyKind, KeySpec, KeyStore, SignatureScheme
from pkcs11_backends.uri import Pkcs11Uri

KID_CERT_THUMBPRINT = "x5t#S256"
KID_JWK_THUMBPRINT = "thumbprint"

# What each JWS algorithm needs from the key (RFC 7518 §3.4: ES256 is P-256 only, ES384 P-384 only).
_NEEDS: dict[str, tuple[KeyKind, Curve | None]] = {
    "PS256": (KeyKind.RSA, None),
    "RS256": (KeyKind.RSA, None),
    "ES256": (KeyKind.EC, Curve.P256),
    "ES384": (KeyKind.EC, Curve.P384),
}
_JWK_CURVES = {Curve.P256: "P-256", Curve.P384: "P-384"}


@dataclasses.dataclass(frozen=True)
class JoseKey:
    """A key pair on the token, ready to sign JWS: its public half, certificate, policy and ``kid``."""

    name: str
    uri: Pkcs11Uri
    spec: KeySpec
    public_jwk: dict[str, str]
    certificate: StoredCertificate | None
    algorithms: tuple[str, ...]
    kid: str
    # The key ``name`` named when this was read (a rotation may point the alias at its successor since): what
    # signs under this ``kid``, so that a kid and a signature always belong to one key.
    signer: str

    def scheme(self, alg: str | None) -> SignatureScheme:
        """The token signature scheme for ``alg`` (default: the key's first allowed algorithm), if allowed."""
        chosen = alg or self.algorithms[0]
        if chosen not in self.algorithms:
            hint = (f"add {chosen!r} to [keys.{self.name}] algorithms if the bank really requires it"
                    if chosen in _NEEDS and _compatible(chosen, self.spec) else
                    f"use one of {', '.join(self.algorithms)}")
            raise AlgorithmNotAllowedError(
                f"key {self.name!r} may not sign with {chosen} (allowed: {', '.join(self.algorithms)})", hint=hint)
        return SignatureScheme.from_jose(chosen)


def resolve(store: KeyStore, config: Config, name: str, policy_of: str | None = None) -> JoseKey:
    """Read a key's public half and certificate from the token and apply its configured policy (that of the
    alias ``policy_of``, for a key that is not configured itself: a rotation's other key)."""
    signer = str(store.resolve(name))  # once: the alias may be switched to another key meanwhile
    info = store.info(signer)
    settings = _key_config(config, policy_of or name)
    jwk = public_jwk(store.public_key_info(signer))
    algorithms = _algorithms(name, settings, info.spec)
    kid = _kid(name, settings, jwk, info.certificate)
    return JoseKey(name, info.uri, info.spec, jwk, info.certificate, algorithms, kid, signer)


def resolved(store: KeyStore, config: Config, name: str, policy_of: str | None = None) -> JoseKey | None:
    """:func:`resolve`, or None when the key cannot sign yet (not on the token, a ``kid`` it cannot have yet)."""
    try:
        return resolve(store, config, name, policy_of)
    except (AgentError, Pkcs11Error):
        return None


def kid_change(name: str, before: JoseKey | None, after: JoseKey | None) -> str | None:
    """The one-line warning when a certificate import changed the key's ``kid`` (by default the JWK thumbprint
    becomes the certificate's x5t#S256, and a new certificate has a new one): a JWKS published before the import
    no longer names the key its JWS carry."""
    if before is None or after is None or before.kid == after.kid:
        return None
    keep = (f'; or set [keys.ALIAS] kid = "{KID_JWK_THUMBPRINT}" to keep it'
            if before.kid == jwk_thumbprint(before.public_jwk) else "")
    return (f"warning: key {name!r} now signs with kid {after.kid!r} (was {before.kid!r}): a JWKS published "
            f"before this import no longer matches; publish `tpp-agent jwks --key {name}` again{keep}")


def _key_config(config: Config, name: str) -> KeyConfig | None:
    """The ``[keys.ALIAS]`` entry for an alias, or for a URI written exactly as a configured one."""
    found = config.keys.get(name)
    return found or next((k for k in config.keys.values() if k.uri == name), None)


def _compatible(alg: str, spec: KeySpec) -> bool:
    kind, curve = _NEEDS[alg]
    return spec.kind is kind and (curve is None or spec.curve is curve)


def _algorithms(name: str, settings: KeyConfig | None, spec: KeySpec) -> tuple[str, ...]:
    if settings is None or not settings.algorithms:
        if spec.kind is KeyKind.RSA:
            return ("PS256",)
        return next((alg,) for alg, (_, curve) in _NEEDS.items() if curve is spec.curve)
    for alg in settings.algorithms:
        if alg not in _NEEDS:
            raise AlgorithmNotAllowedError(f"[keys.{settings.alias}] algorithms lists unknown algorithm {alg!r}",
                                           hint=f"use {', '.join(_NEEDS)}")
        if not _compatible(alg, spec):
            raise AlgorithmNotAllowedError(f"[keys.{settings.alias}] algorithms lists {alg}, "
                                           f"which key {name!r} ({spec}) cannot make",
                                           hint="PS256/RS256 need an RSA key, ES256 a P-256 key, ES384 a P-384 key")
    return settings.algorithms


def _kid(name: str, settings: KeyConfig | None, jwk: dict[str, str], cert: StoredCertificate | None) -> str:
    wanted = settings.kid if settings else None
    if wanted == KID_JWK_THUMBPRINT or (wanted is None and cert is None):
        return jwk_thumbprint(jwk)
    if wanted == KID_CERT_THUMBPRINT or wanted is None:
        if cert is None:
            raise KidError(f"key {name!r} has kid = \"x5t#S256\" but no certificate on the token",
                           hint="import the key's certificate (the directory issues it), or configure another kid")
        return cert_thumbprint(cert.der)
    return wanted


def public_jwk(spki: asn1_keys.PublicKeyInfo) -> dict[str, str]:
    """The public members of a JWK (RFC 7518 §6) for an RSA or EC SubjectPublicKeyInfo."""
    if spki.algorithm == "rsa":
        rsa: Any = spki["public_key"].parsed
        return {"kty": "RSA", "n": b64url_uint(rsa["modulus"].native), "e": b64url_uint(rsa["public_exponent"].native)}
    curve = Curve.from_asn1_name(spki.curve[1])
    point: bytes = spki["public_key"].native
    size = (curve.bits + 7) // 8
    if len(point) != 1 + 2 * size or point[0] != 4:
        raise KidError(f"the token's EC public key is not an uncompressed {curve.short} point")
    return {"kty": "EC", "crv": _JWK_CURVES[curve], "x": b64url(point[1:1 + size]), "y": b64url(point[1 + size:])}


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members in lexicographic order, no whitespace."""
    required = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    return b64url(hashlib.sha256(compact_json({k: jwk[k] for k in required})).digest())


def cert_thumbprint(der: bytes) -> str:
    """``x5t#S256`` (RFC 7515 §4.1.8): base64url of the SHA-256 of the certificate's DER."""
    return b64url(hashlib.sha256(der).digest())
