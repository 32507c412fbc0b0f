"""Key pairs on the token: generation, lookup by ``pkcs11:`` URI, public keys, signing.

Private keys are created sensitive and non-extractable and are only ever used
through ``C_Sign``; nothing here can read private key material.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import threading
from collections.abc import Mapping
from typing import Any, cast

import pkcs11
from asn1crypto import core, keys
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import MGF
from pkcs11.types import SignMixin
from pkcs11.util.ec import encode_named_curve_parameters

from pkcs11_backends.certificates import StoredCertificate, find_certificate
from pkcs11_backends.errors import (
    AmbiguousKeyError,
    DuplicateKeyError,
    KeyNotFoundError,
    KeySpecError,
    MechanismError,
    UriError,
)
from pkcs11_backends.sessions import PooledSession, SessionPool
from pkcs11_backends.uri import ObjectType, Pkcs11Uri


class KeyKind(enum.Enum):
    RSA = "rsa"
    EC = "ec"


class Curve(enum.Enum):
    P256 = ("p256", "secp256r1", 256, "sha256")
    P384 = ("p384", "secp384r1", 384, "sha384")

    def __init__(self, short: str, asn1_name: str, bits: int, hash_name: str) -> None:
        self.short = short
        self.asn1_name = asn1_name
        self.bits = bits
        self.hash_name = hash_name

    @classmethod
    def from_asn1_name(cls, name: str) -> Curve:
        for curve in cls:
            if curve.asn1_name == name:
                return curve
        raise KeySpecError(f"unsupported EC curve {name!r}")


RSA_SIZES = (2048, 3072, 4096)


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """What to generate: ``rsa:2048`` … ``rsa:4096``, ``ec:p256``, ``ec:p384``."""

    kind: KeyKind
    bits: int
    curve: Curve | None = None

    @classmethod
    def parse(cls, text: str) -> KeySpec:
        kind, _, size = text.strip().lower().partition(":")
        if kind == "rsa" and size.isdigit() and int(size) in RSA_SIZES:
            return cls(KeyKind.RSA, int(size))
        if kind == "ec":
            for curve in Curve:
                if size in (curve.short, curve.asn1_name, f"p-{curve.bits}"):
                    return cls(KeyKind.EC, curve.bits, curve)
        raise KeySpecError(f"unsupported key type {text!r}")

    def __str__(self) -> str:
        return f"ec:{self.curve.short}" if self.curve else f"rsa:{self.bits}"


class SignatureScheme(enum.Enum):
    """Signature algorithms the token is asked for; output is what the standard wants raw.

    ECDSA signatures come back as raw ``r||s`` (JWS form); X.509 callers convert to DER.
    """

    RSA_PKCS1_SHA256 = ("RS256", KeyKind.RSA, "sha256")
    RSA_PSS_SHA256 = ("PS256", KeyKind.RSA, "sha256")
    ECDSA_SHA256 = ("ES256", KeyKind.EC, "sha256")
    ECDSA_SHA384 = ("ES384", KeyKind.EC, "sha384")

    def __init__(self, jose_name: str, kind: KeyKind, hash_name: str) -> None:
        self.jose_name = jose_name
        self.kind = kind
        self.hash_name = hash_name

    @classmethod
    def from_jose(cls, name: str) -> SignatureScheme:
        scheme = _BY_JOSE_NAME.get(name)
        if scheme is not None:
            return scheme
        raise MechanismError(f"unsupported signature algorithm {name!r}", hint="use PS256, ES256, ES384 or RS256")


_BY_JOSE_NAME = {scheme.jose_name: scheme for scheme in SignatureScheme}


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """What ``keys list`` shows about a key pair on the token."""

    label: str
    id: bytes
    spec: KeySpec
    uri: Pkcs11Uri
    certificate: StoredCertificate | None

    def as_dict(self) -> dict[str, object]:
        cert = self.certificate
        return {
            "label": self.label,
            "id": self.id.hex(),
            "type": str(self.spec),
            "uri": str(self.uri),
            "certificate": cert.as_dict() if cert else None,
        }


_PRIVATE_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
_PUBLIC_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}


class KeyStore:
    """The keys of one token, named by ``pkcs11:`` URIs or configured aliases."""

    def __init__(self, pool: SessionPool, aliases: Mapping[str, str] | None = None) -> None:
        self.pool = pool
        self.aliases = dict(aliases or {})
        self._generate_lock = threading.Lock()

    @property
    def aliases(self) -> dict[str, str]:
        return self._aliases

    @aliases.setter
    def aliases(self, value: dict[str, str]) -> None:
        # Parsing a name costs more than the rest of a request's bookkeeping: each is parsed once per alias set.
        self._aliases = value
        self._resolved: dict[str, Pkcs11Uri] = {}

    # -- naming --------------------------------------------------------------
    def resolve(self, name: str) -> Pkcs11Uri:
        """A user's key name (URI or alias) as a URI for a private key on our token."""
        try:
            return self._resolved[name]
        except KeyError:
            pass
        uri = self._resolve(name)
        if len(self._resolved) < 1024:  # names come from callers: bound what they can make us keep
            self._resolved[name] = uri
        return uri

    def _resolve(self, name: str) -> Pkcs11Uri:
        text = self.aliases.get(name, name)
        if not text.lower().startswith("pkcs11:"):
            known = ", ".join(sorted(self.aliases)) or "none configured"
            raise UriError(f"{name!r} is neither a pkcs11: URI nor a key alias (aliases: {known})")
        uri = Pkcs11Uri.parse(text)
        if uri.object is None and uri.id is None:
            raise UriError(f"{text!r} names no key: add object=LABEL or id=%XX")
        if uri.type not in (None, ObjectType.PRIVATE, ObjectType.PUBLIC, ObjectType.CERT):
            raise UriError(f"{text!r} names a {uri.type.value} object, not a key")
        token = self.pool.selector
        if uri.token is not None and token.label is not None and uri.token != token.label:
            raise KeyNotFoundError(f"{text!r} is on token {uri.token!r}; this agent serves {token.label!r}")
        return uri

    def uri_for(self, label: str, key_id: bytes) -> Pkcs11Uri:
        return Pkcs11Uri(token=self.pool.token.label, object=label, id=key_id, type=ObjectType.PRIVATE)

    # -- lookup --------------------------------------------------------------
    def _find(self, session: pkcs11.Session, uri: Pkcs11Uri, object_class: ObjectClass) -> pkcs11.Object:
        attrs: dict[Attribute, object] = {Attribute.CLASS: object_class}
        if uri.object is not None:
            attrs[Attribute.LABEL] = uri.object
        if uri.id is not None:
            attrs[Attribute.ID] = uri.id
        found = list(session.get_objects(attrs))
        if not found:
            raise KeyNotFoundError(f"no {object_class.name.lower().replace('_', ' ')} matches {uri}")
        if len(found) > 1:
            raise AmbiguousKeyError(f"{len(found)} objects match {uri}")
        return found[0]

    def private_key(self, pooled: PooledSession, uri: Pkcs11Uri) -> SignMixin:
        found = pooled.cached(("private", uri.object, uri.id), lambda s: self._find(s, uri, ObjectClass.PRIVATE_KEY))
        return cast(SignMixin, found)

    def info(self, name: str) -> KeyInfo:
        uri = self.resolve(name)
        return self.pool.call(lambda pooled: self._info(pooled.session, self._find(pooled.session, uri,
                                                                                    ObjectClass.PRIVATE_KEY)))

    def list(self) -> list[KeyInfo]:
        def collect(pooled: PooledSession) -> list[KeyInfo]:
            session = pooled.session
            # Materialise the search first: PKCS#11 allows one active search per session.
            found = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
            return sorted((self._info(session, key) for key in found), key=lambda k: (k.label, k.id))

        return self.pool.call(collect)

    def _info(self, session: pkcs11.Session, key: pkcs11.Object) -> KeyInfo:
        label = key[Attribute.LABEL]
        key_id = bytes(key[Attribute.ID])
        key_type = key[Attribute.KEY_TYPE]
        if key_type == KeyType.RSA:
            spec = KeySpec(KeyKind.RSA, len(key[Attribute.MODULUS]) * 8)
        elif key_type == KeyType.EC:
            curve = Curve.from_asn1_name(keys.ECDomainParameters.load(key[Attribute.EC_PARAMS]).chosen.native)
            spec = KeySpec(KeyKind.EC, curve.bits, curve)
        else:
            raise KeySpecError(f"key {label!r} has unsupported type {key_type!r}")
        return KeyInfo(label, key_id, spec, self.uri_for(label, key_id), find_certificate(session, key_id))

    def public_key_info(self, name: str) -> keys.PublicKeyInfo:
        """The key's SubjectPublicKeyInfo, read from the token's public object."""
        uri = self.resolve(name)

        def read(pooled: PooledSession) -> keys.PublicKeyInfo:
            cached: keys.PublicKeyInfo = pooled.cached(("spki", uri.object, uri.id),
                                                       lambda s: _spki(self._find(s, uri, ObjectClass.PUBLIC_KEY)))
            return cached

        return self.pool.call(read)

    # -- generation ----------------------------------------------------------
    def check_free(self, label: str, key_id: bytes | None = None) -> None:
        """Raise :class:`DuplicateKeyError` if an object already has this label (or id): before a slow generate."""
        self.pool.call(lambda pooled: _check_free(pooled.session, label, key_id))

    def generate(self, label: str, spec: KeySpec, key_id: bytes | None = None) -> KeyInfo:
        if not label or len(label.encode("utf-8")) > 128:
            raise KeySpecError("a key label must be 1 to 128 bytes", hint="pass --label NAME")
        key_id = key_id if key_id is not None else os.urandom(8)
        with self._generate_lock, self.pool.session() as pooled:
            session = pooled.session
            _check_free(session, label, key_id)
            common: dict[str, Any] = {"label": label, "id": key_id, "store": True,
                      "public_template": _PUBLIC_TEMPLATE, "private_template": _PRIVATE_TEMPLATE}
            if spec.kind is KeyKind.RSA:
                _, private = session.generate_keypair(KeyType.RSA, spec.bits, **common)
            else:
                assert spec.curve is not None
                params = session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(spec.curve.asn1_name)},
                    local=True)
                _, private = params.generate_keypair(**common)
            return self._info(session, private)

    # -- signing -------------------------------------------------------------
    def sign(self, name: str | Pkcs11Uri, data: bytes, scheme: SignatureScheme,
             timeout: float | None = None) -> bytes:
        """Sign on the token; ``timeout`` bounds the wait (default: the pool's call timeout)."""
        uri = name if isinstance(name, Pkcs11Uri) else self.resolve(name)

        def run(pooled: PooledSession) -> bytes:
            return sign_with(self.private_key(pooled, uri), data, scheme)

        return self.pool.call(run, timeout)

    def kind_of(self, name: str | Pkcs11Uri) -> KeyKind:
        uri = name if isinstance(name, Pkcs11Uri) else self.resolve(name)

        def read(pooled: PooledSession) -> KeyKind:
            key_type = self.private_key(pooled, uri)[Attribute.KEY_TYPE]
            return KeyKind.RSA if key_type == KeyType.RSA else KeyKind.EC

        return self.pool.call(read)


def _check_free(session: pkcs11.Session, label: str, key_id: bytes | None) -> None:
    checks: list[tuple[dict[Attribute, Any], str]] = [({Attribute.LABEL: label}, f"label {label!r}")]
    if key_id is not None:
        checks.append(({Attribute.ID: key_id}, f"id {key_id.hex()}"))
    for attrs, what in checks:
        if list(session.get_objects(attrs)):
            raise DuplicateKeyError(f"the token already has an object with {what}; nothing was created")


def sign_with(key: SignMixin, data: bytes, scheme: SignatureScheme) -> bytes:
    key_type = cast(pkcs11.Key, key).key_type
    if (scheme.kind is KeyKind.RSA) != (key_type == KeyType.RSA):
        raise MechanismError(f"{scheme.jose_name} cannot be made with a {key_type.name} key")
    if scheme is SignatureScheme.RSA_PKCS1_SHA256:
        return bytes(key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS))
    if scheme is SignatureScheme.RSA_PSS_SHA256:
        return bytes(key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
                              mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32)))
    # SoftHSM2 2.6 has no CKM_ECDSA_SHA256: hash here, sign the digest with CKM_ECDSA.
    digest = hashlib.new(scheme.hash_name, data).digest()
    return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))


def _spki(public: pkcs11.Object) -> keys.PublicKeyInfo:
    key_type = public[Attribute.KEY_TYPE]
    if key_type == KeyType.RSA:
        rsa = keys.RSAPublicKey({
            "modulus": int.from_bytes(public[Attribute.MODULUS], "big"),
            "public_exponent": int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
        })
        return keys.PublicKeyInfo({"algorithm": {"algorithm": "rsa"}, "public_key": rsa})
    params = keys.ECDomainParameters.load(public[Attribute.EC_PARAMS])
    point = core.OctetString.load(public[Attribute.EC_POINT]).native
    return keys.PublicKeyInfo({"algorithm": {"algorithm": "ec", "parameters": params}, "public_key": point})
