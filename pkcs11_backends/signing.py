"""How each signature algorithm is asked of a token: a table of methods, chosen by what the module says it can do.

A hash-and-sign mechanism the module lists is used as it is (``CKM_SHA256_RSA_PKCS``...);
where it is missing, or listed but not carried (p11-kit 0.24's RPC cannot carry the
parameters of ``CKM_SHA256_RSA_PKCS_PSS`` and leaves it out of its list), the raw
mechanism signs a hash computed here: ``CKM_RSA_PKCS`` over a DigestInfo,
``CKM_RSA_PKCS_PSS`` over a SHA-256, ``CKM_ECDSA`` over a digest. Hash-and-sign comes
first because a module may implement a raw mechanism as something a sign-only key
refuses: tpm2-pkcs11 makes ``CKM_RSA_PKCS`` a TPM decryption (``CKR_GENERAL_ERROR``),
and that failure leaves the key "in use" inside the module.

A method the module lists but then refuses (``CKR_MECHANISM_INVALID``,
``CKR_MECHANISM_PARAM_INVALID``, ...) is dropped for the life of the process and the
next one is tried: the listing of a remoted module may say more than the wire carries.
So is one that fails while the next one works.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Iterable, Mapping
from typing import cast

import pkcs11
from pkcs11 import KeyType, Mechanism, MechanismFlag
from pkcs11.mechanisms import MGF
from pkcs11.types import SignMixin

from pkcs11_backends.errors import MechanismError
from pkcs11_backends.returns import ReturnValue, describe, rv_of
from pkcs11_backends.schemes import KeyKind, SignatureScheme

# DER of DigestInfo up to the digest (RFC 8017, 9.2 note 1).
_DIGEST_INFO_PREFIX = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
}
_PSS_PARAMS = {"sha256": (Mechanism.SHA256, MGF.SHA256, 32)}
# The answers that mean "not this way" rather than "not this key" or "not now".
_REFUSED_METHOD = frozenset({ReturnValue.MECHANISM_INVALID, ReturnValue.MECHANISM_PARAM_INVALID,
                             ReturnValue.FUNCTION_NOT_SUPPORTED, ReturnValue.ARGUMENTS_BAD})
# Answers that may mean "not this way" too (see the module docstring). A method that fails
# so while the next one works is dropped; if all fail, the first failure is the answer.
_FAILED_METHOD = frozenset({ReturnValue.GENERAL_ERROR, ReturnValue.FUNCTION_FAILED,
                            ReturnValue.KEY_FUNCTION_NOT_PERMITTED})


@dataclasses.dataclass(frozen=True)
class SigningMethod:
    mechanism: Mechanism
    local_hash: bool  # the digest is computed here and the token signs it
    digest_info: bool = False  # the digest goes in a DigestInfo (CKM_RSA_PKCS)
    pss: bool = False

    def sign(self, key: SignMixin, data: bytes, scheme: SignatureScheme) -> bytes:
        message = data
        if self.local_hash:
            message = hashlib.new(scheme.hash_name, data).digest()
            if self.digest_info:
                message = _DIGEST_INFO_PREFIX[scheme.hash_name] + message
        if self.pss:
            return bytes(key.sign(message, mechanism=self.mechanism, mechanism_param=_PSS_PARAMS[scheme.hash_name]))
        return bytes(key.sign(message, mechanism=self.mechanism))

    def __str__(self) -> str:
        how = " over a local digest" if self.local_hash else ""
        return f"CKM_{self.mechanism.name}{how}"


METHODS: Mapping[SignatureScheme, tuple[SigningMethod, ...]] = {
    SignatureScheme.RSA_PKCS1_SHA256: (SigningMethod(Mechanism.SHA256_RSA_PKCS, False),
                                       SigningMethod(Mechanism.RSA_PKCS, True, digest_info=True)),
    SignatureScheme.RSA_PSS_SHA256: (SigningMethod(Mechanism.SHA256_RSA_PKCS_PSS, False, pss=True),
                                     SigningMethod(Mechanism.RSA_PKCS_PSS, True, pss=True)),
    SignatureScheme.ECDSA_SHA256: (SigningMethod(Mechanism.ECDSA_SHA256, False), SigningMethod(Mechanism.ECDSA, True)),
    SignatureScheme.ECDSA_SHA384: (SigningMethod(Mechanism.ECDSA_SHA384, False), SigningMethod(Mechanism.ECDSA, True)),
}
GENERATION = {KeyKind.RSA: Mechanism.RSA_PKCS_KEY_PAIR_GEN, KeyKind.EC: Mechanism.EC_KEY_PAIR_GEN}


@dataclasses.dataclass(frozen=True)
class MechanismLimits:
    flags: int
    min_key: int
    max_key: int  # bits for RSA and EC (PKCS#11 3.0 section 2.8); 0 when the module gives none


class Capabilities:
    """What one token's module says it can do (``C_GetMechanismList``/``C_GetMechanismInfo``), and what it refused.

    ``None`` as the mechanism list means the module would not tell: every method is then
    tried in table order, and the refusals teach the rest.
    """

    def __init__(self, mechanisms: Mapping[Mechanism, MechanismLimits] | None, module: str) -> None:
        self.mechanisms = mechanisms
        self.module = module
        self._refused: set[SigningMethod] = set()
        self._lock = threading.Lock()
        # methods() by (scheme, bits), asked on every signature: worked out once, and again after a refusal. A
        # list worked out while a refusal is noted may keep the refused method: it is refused once more, and
        # dropped then.
        self._chosen: dict[tuple[SignatureScheme, int | None], tuple[SigningMethod, ...]] = {}

    @classmethod
    def probe(cls, token: pkcs11.Token, module: str) -> Capabilities:
        slot = token.slot
        try:
            listed = list(slot.get_mechanisms())
        except pkcs11.PKCS11Error:
            return cls(None, module)
        known: dict[Mechanism, MechanismLimits] = {}
        for mechanism in listed:
            if not isinstance(mechanism, Mechanism):
                continue  # vendor mechanisms: python-pkcs11 hands them over as plain ints
            try:
                info = slot.get_mechanism_info(mechanism)
            except pkcs11.PKCS11Error:
                continue
            known[mechanism] = MechanismLimits(int(info.flags), info.min_key_length or 0, info.max_key_length or 0)
        return cls(known, module)

    def _offers(self, mechanism: Mechanism, flag: MechanismFlag, bits: int | None) -> bool:
        if self.mechanisms is None:
            return True
        limits = self.mechanisms.get(mechanism)
        if limits is None or not limits.flags & flag:
            return False
        if bits is None or not limits.max_key:
            return True
        return limits.min_key <= bits <= limits.max_key

    def methods(self, scheme: SignatureScheme, bits: int | None = None) -> tuple[SigningMethod, ...]:
        """The ways to make ``scheme`` with a key of ``bits``, best first."""
        chosen = self._chosen.get((scheme, bits))
        if chosen is None:
            chosen = tuple(m for m in METHODS[scheme]
                           if m not in self._refused and self._offers(m.mechanism, MechanismFlag.SIGN, bits))
            self._chosen[scheme, bits] = chosen
        return chosen

    def _refuse(self, methods: Iterable[SigningMethod]) -> None:
        with self._lock:
            self._refused.update(methods)
            self._chosen = {}

    def can_generate(self, kind: KeyKind, bits: int | None = None) -> bool:
        return self._offers(GENERATION[kind], MechanismFlag.GENERATE_KEY_PAIR, bits)

    def missing(self, kind: KeyKind, bits: int | None = None) -> list[SignatureScheme]:
        """The algorithms a key of this kind and size cannot make on this module."""
        return [s for s in SignatureScheme if s.kind is kind and not self.methods(s, bits)]

    def summary(self) -> str:
        if self.mechanisms is None:
            return "the module does not list its mechanisms; every method is tried in turn"
        parts = []
        for scheme in SignatureScheme:
            chosen = self.methods(scheme)
            parts.append(f"{scheme.jose_name} by {chosen[0]}" if chosen else f"no {scheme.jose_name}")
        return "; ".join(parts)

    def sign(self, key: SignMixin, data: bytes, scheme: SignatureScheme) -> bytes:
        key_type = cast(pkcs11.Key, key).key_type
        if (scheme.kind is KeyKind.RSA) != (key_type == KeyType.RSA):
            raise MechanismError(f"{scheme.jose_name} cannot be made with a {key_type.name} key")
        methods = self.methods(scheme)
        if not methods:
            raise MechanismError(f"the PKCS#11 module {self.module} offers no mechanism for {scheme.jose_name}",
                                 hint=f"it needs one of {_names(METHODS[scheme])}; use another algorithm or module")
        refused: pkcs11.PKCS11Error | None = None
        failed: list[tuple[SigningMethod, pkcs11.PKCS11Error]] = []
        for method in methods:
            try:
                signature = method.sign(key, data, scheme)
            except pkcs11.PKCS11Error as exc:
                rv = rv_of(exc)
                if rv in _REFUSED_METHOD:
                    refused = exc
                    self._refuse((method,))
                elif rv in _FAILED_METHOD:
                    failed.append((method, exc))
                else:
                    raise
                continue
            if failed:  # another method worked: the module cannot do the ones that "failed" (see _FAILED_METHOD)
                self._refuse(m for m, _ in failed)
            return signature
        if failed:
            raise failed[0][1]  # the module's own failure, for the pool to count
        assert refused is not None
        raise MechanismError(
            f"the PKCS#11 module {self.module} refused {scheme.jose_name} by {_names(methods)}: {describe(refused)}",
            hint="it lists these mechanisms but refuses them; use another algorithm or module")


def _names(methods: Iterable[SigningMethod]) -> str:
    return ", ".join(str(m) for m in methods)


def sign_with(key: SignMixin, data: bytes, scheme: SignatureScheme, capabilities: Capabilities | None = None) -> bytes:
    """Sign with the first method of the table the module takes (each in turn when nothing was probed)."""
    return (capabilities or _UNPROBED).sign(key, data, scheme)


# For callers that sign with a key of their own, outside a KeyStore (bench): what the
# module refused is remembered, so that a loop does not pay for the refusal every time.
# A process has one module (see Module.load), so what one key's module refused holds for all.
_UNPROBED = Capabilities(None, "in use")
