"""Key pairs on the token: generation, lookup by ``pkcs11:`` URI, public keys, signing.

Private keys are created sensitive and non-extractable and are only ever used
through ``C_Sign``; nothing here can read private key material.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import threading
from collections.abc import Mapping
from typing import Any, cast

import pkcs11
from asn1crypto import core, keys
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.types import SignMixin
from pkcs11.util.ec import encode_named_curve_parameters

from pkcs11_backends.certificates import StoredCertificate, find_certificate
from pkcs11_backends.errors import (
    AmbiguousKeyError,
    DuplicateKeyError,
    KeyNotFoundError,
    KeySpecError,
    KeyTemplateError,
    UriError,
)
from pkcs11_backends.returns import ReturnValue, describe, rv_of
from pkcs11_backends.schemes import KeyKind, SignatureScheme
from pkcs11_backends.sessions import PooledSession, SessionPool
from pkcs11_backends.signing import Capabilities, sign_with
from pkcs11_backends.uri import ObjectType, Pkcs11Uri

# KeyKind, SignatureScheme and sign_with live in schemes.py and signing.py; callers find them here too.
__all__ = ["KEY_TEMPLATES", "Curve", "KeyInfo", "KeyKind", "KeySpec", "KeyStore", "KeyTemplate", "SignatureScheme",
           "sign_with"]


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
# What the private key must be, whatever template the module took.
_PRIVATE_MUST = {Attribute.SIGN: True, Attribute.DECRYPT: False, Attribute.UNWRAP: False,
                 Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}


@dataclasses.dataclass(frozen=True)
class KeyTemplate:
    """A public-key template; the private one never changes (sign only, sensitive, never extractable)."""

    name: str
    public: Mapping[Attribute, Any]


# Tried in order. Some modules couple usage attributes: tpm2-pkcs11 derives one TPM
# object from both halves, so public CKA_VERIFY must equal private CKA_DECRYPT and
# public CKA_ENCRYPT private CKA_SIGN (a sign-only TPM key "encrypts" with its public
# half). The public object's usage flags are never used: verification is done off the token.
KEY_TEMPLATES = (
    KeyTemplate("public CKA_VERIFY=true, CKA_ENCRYPT=false",
                {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.VERIFY: True, Attribute.ENCRYPT: False,
                 Attribute.WRAP: False}),
    KeyTemplate("public usage coupled to the private key's (CKA_VERIFY=false, CKA_ENCRYPT=true)",
                {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.VERIFY: False, Attribute.ENCRYPT: True,
                 Attribute.WRAP: False}),
)
# Answers to C_GenerateKeyPair that mean "not this template" (tpm2-pkcs11 says CKR_GENERAL_ERROR).
_TEMPLATE_REFUSED = frozenset({ReturnValue.TEMPLATE_INCONSISTENT, ReturnValue.TEMPLATE_INCOMPLETE,
                               ReturnValue.ATTRIBUTE_VALUE_INVALID, ReturnValue.ATTRIBUTE_TYPE_INVALID,
                               ReturnValue.ATTRIBUTE_READ_ONLY, ReturnValue.GENERAL_ERROR,
                               ReturnValue.FUNCTION_FAILED})


class _Names:
    """An alias set and the URIs resolved from it, replaced together: a resolve racing a new set (a rotation's
    switch) caches into its own set's dict, never an old name into the new one. Shared by the stores that wrap
    one (the audited signer): a new set is in force for all of them at once."""

    __slots__ = ("current",)

    def __init__(self, aliases: dict[str, str]) -> None:
        self.current: tuple[dict[str, str], dict[str, Pkcs11Uri]] = (aliases, {})


class KeyStore:
    """The keys of one token, named by ``pkcs11:`` URIs, configured aliases, or the label of exactly one key;
    ``names_of``: share that store's aliases (a wrapper of it)."""

    def __init__(self, pool: SessionPool, aliases: Mapping[str, str] | None = None, *,
                 names_of: KeyStore | None = None) -> None:
        self.pool = pool
        self._names: _Names = names_of._names if names_of is not None else _Names(dict(aliases or {}))
        self._generate_lock = threading.Lock()

    @property
    def aliases(self) -> dict[str, str]:
        return self._names.current[0]

    @aliases.setter
    def aliases(self, value: dict[str, str]) -> None:
        # Parsing a name costs more than the rest of a request's bookkeeping: each is parsed once per alias set.
        self._names.current = (value, {})

    @functools.cached_property
    def capabilities(self) -> Capabilities:
        """The token's mechanisms, read once (it logs in first, as some modules list them only then)."""
        token = self.pool.token
        return Capabilities.probe(token, self.pool.module.path)

    # -- naming --------------------------------------------------------------
    def resolve(self, name: str) -> Pkcs11Uri:
        """A user's key name (URI, alias or label) as a URI for a private key on our token."""
        aliases, resolved = self._names.current
        try:
            return resolved[name]
        except KeyError:
            pass
        text = aliases.get(name, name)
        if not text.lower().startswith("pkcs11:"):
            return self._labelled(name)  # not kept: what the token holds changes, a URI's meaning does not
        uri = self._resolve(text)
        if len(resolved) < 1024:  # names come from callers: bound what they can make us keep
            resolved[name] = uri
        return uri

    def _labelled(self, name: str) -> Pkcs11Uri:
        """``keys generate --label transport`` then ``csr --key transport``: the one private key of that label."""
        def find(pooled: PooledSession) -> list[bytes]:
            found = pooled.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: name})
            return [bytes(key[Attribute.ID]) for key in found]

        ids = self.pool.call(find) if name else []
        if len(ids) == 1:
            return self.uri_for(name, ids[0])
        if ids:
            raise AmbiguousKeyError(f"{len(ids)} keys on the token are labelled {name!r}",
                                    hint="name one by its pkcs11: URI with its id (`tpp-agent keys list` shows them)")
        known = ", ".join(sorted(self.aliases)) or "none configured"
        raise KeyNotFoundError(f"{name!r} is not a pkcs11: URI, a key alias (aliases: {known}) or the label of a "
                               "key on the token", hint="`tpp-agent keys list` shows the token's keys")

    def _resolve(self, text: str) -> Pkcs11Uri:
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
        # A key without a label (NSS's certutil makes them so until a certificate names them) is named by its id:
        # "object=" would ask for an empty label.
        return Pkcs11Uri(token=self.pool.token.label, object=label or None, id=key_id, type=ObjectType.PRIVATE)

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
        if not self.capabilities.can_generate(spec.kind, spec.bits):
            raise KeySpecError(f"the PKCS#11 module {self.pool.module.path} cannot generate {spec} key pairs",
                               hint="pick a key type the module offers (`tpp-agent doctor` lists them)")
        key_id = key_id if key_id is not None else os.urandom(8)
        with self._generate_lock, self.pool.session() as pooled:
            session = pooled.session
            _check_free(session, label, key_id)
            refusals: list[str] = []
            for template in KEY_TEMPLATES:
                try:
                    private = _generate(session, spec, label, key_id, template)
                except pkcs11.PKCS11Error as exc:
                    if rv_of(exc) not in _TEMPLATE_REFUSED:
                        raise
                    refusals.append(f"{template.name}: {describe(exc)}")
                    continue
                _check_private(session, private, label, key_id)
                return self._info(session, private)
        raise KeyTemplateError(f"the PKCS#11 module {self.pool.module.path} refused every {spec} key template "
                               f"(private key CKA_SIGN=true, CKA_DECRYPT=false, CKA_UNWRAP=false; "
                               f"{'; '.join(refusals)}); nothing was created")

    def destroy(self, label: str, key_id: bytes) -> int:
        """Remove the key pair ``label``/``key_id`` and its certificates (same CKA_ID) from the token; how many
        objects went. Only a retired key is ever removed (``tpp-agent rotate remove-retired``)."""
        def run(pooled: PooledSession) -> int:
            session = pooled.session
            found = [*session.get_objects({Attribute.LABEL: label, Attribute.ID: key_id}),
                     *session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: key_id})]
            unique = {obj.handle: obj for obj in found}
            for obj in unique.values():
                obj.destroy()
            return len(unique)

        with self._generate_lock:
            return self.pool.call(run)

    # -- signing -------------------------------------------------------------
    def sign(self, name: str | Pkcs11Uri, data: bytes, scheme: SignatureScheme,
             timeout: float | None = None) -> bytes:
        """Sign on the token; ``timeout`` bounds the wait (default: the pool's call timeout)."""
        uri = name if isinstance(name, Pkcs11Uri) else self.resolve(name)

        def run(pooled: PooledSession) -> bytes:
            return self.capabilities.sign(self.private_key(pooled, uri), data, scheme)

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


def _generate(session: pkcs11.Session, spec: KeySpec, label: str, key_id: bytes,
              template: KeyTemplate) -> pkcs11.Object:
    common: dict[str, Any] = {"label": label, "id": key_id, "store": True, "public_template": dict(template.public),
                              "private_template": _PRIVATE_TEMPLATE}
    if spec.kind is KeyKind.RSA:
        _, private = session.generate_keypair(KeyType.RSA, spec.bits, **common)
    else:
        assert spec.curve is not None
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(spec.curve.asn1_name)}, local=True)
        _, private = params.generate_keypair(**common)
    return cast(pkcs11.Object, private)


def _check_private(session: pkcs11.Session, private: pkcs11.Object, label: str, key_id: bytes) -> None:
    """A module that took a template may still have set usages of its own: such a key is removed, not kept."""
    wrong = [f"{attr.name}={private[attr]}" for attr, value in _PRIVATE_MUST.items() if private[attr] != value]
    if not wrong:
        return
    for obj in list(session.get_objects({Attribute.LABEL: label, Attribute.ID: key_id})):
        obj.destroy()
    raise KeyTemplateError(f"the module made a private key with {', '.join(wrong)}; it was destroyed",
                           hint="this module cannot make a sign-only key: make one with its own tool and name it "
                                "by label")


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
