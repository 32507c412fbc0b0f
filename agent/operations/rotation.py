"""Key rotation (agent/rotation/steps.py): each step an admin's operation; the status view may be granted.

A transport key's successor CSR repeats the current certificate's subject (no caller chooses what the directory
certifies for the agent's TLS identity); a jws key's may name another subject; an encryption key's successor is
decrypt-only and has no CSR.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, NotRequired, TypedDict

from agent.config import KeyPurpose
from agent.operations.banks import BankAnswer, RegistrationAnswer
from agent.operations.core import Context
from agent.operations.directory import DirectoryCertificateEntry
from agent.operations.inputs import InvalidInput, Nothing, text
from agent.operations.spec import Access, Operation, Resource, Spec
from agent.rotation import steps

MAX_CERTIFICATE_TEXT = 1 << 20
_ROTATED = frozenset({KeyPurpose.TLS, KeyPurpose.JWS, KeyPurpose.ENCRYPTION})
_Stamp = Annotated[str, "ISO 8601"]
_Label = Annotated[str, "CKA_LABEL of a key on the token"]
_Purpose = Literal["tls", "jws", "encryption"]


class RotationStarted(TypedDict):
    key: str
    purpose: _Purpose
    current: _Label
    successor: Annotated[str, "CKA_LABEL of the successor key just made: the current label's stem, .N"]
    uri: Annotated[str, "the successor's pkcs11: URI"]
    type: Annotated[str, "rsa:2048, ec:p256...: the current key's"]
    subject: Annotated[str | None, "RFC 4514: the subject the CSR names (None: an encryption key, no CSR)"]
    alg: str | None
    csr: Annotated[str | None, "the successor's PKCS#10 request, PEM: for the directory. None for an encryption "
                              "key: its decrypt-only successor cannot sign one"]


class RotationCertificate(TypedDict):
    subject: str
    sha256: Annotated[str, "of the DER, hex"]
    not_after: _Stamp


class SuccessorImported(TypedDict):
    key: str
    successor: _Label
    already_present: Annotated[bool, "the token held this certificate already (the step again: nothing changed); "
                                     "without a certificate: the successor was published already"]
    certificate: Annotated[RotationCertificate | None, "None: an encryption key's successor published without one"]
    overlap_started_at: _Stamp
    signing_switch_after: Annotated[str | None, "jws keys: when signing may switch (the JWKS cache window after "
                                                "the overlap started); None for a tls or encryption key"]
    retire_after: NotRequired[Annotated[str, "encryption keys: when the old key may be retired, which is their "
                                             "switch (the JWKS cache window after the overlap started)"]]


class SuccessorCertified(SuccessorImported, BankAnswer):
    directory_certificate: Annotated[DirectoryCertificateEntry, "the certificate the directory issued for the "
                                                                "successor's CSR"]
    reused: Annotated[bool, "the directory held an active certificate for the successor's key already (a retry "
                            "after a lost answer): no CSR was sent"]


class SigningSwitched(TypedDict):
    key: str
    signing: Annotated[str, "CKA_LABEL of the key that signs from now on"]
    kid: Annotated[str, "the kid its JWS carry"]
    signing_switched_at: _Stamp
    retire_after: Annotated[str, "when the old key may be retired: the JWKS cache window after the switch"]


class TransportSwitched(BankAnswer):
    key: str
    bank: str
    successor: _Label
    switched_at: _Stamp
    registration: Annotated[RegistrationAnswer, "the successor's certificate registered at the bank first"]
    banks_left: Annotated[list[str], "the key's banks still given the old certificate"]


class Retired(TypedDict):
    key: str
    current: Annotated[str, "CKA_LABEL of the key now current: the successor"]
    retired: Annotated[str, "CKA_LABEL of the key retired (kept on the token, out of the JWKS)"]
    retired_at: _Stamp
    version: Annotated[int, "of the rotation's shared state"]
    config_hint: str
    remove_after: NotRequired[Annotated[str, "encryption keys: the retired key decrypts until it is removed, which "
                                             "remove-retired refuses before this ([rotation] "
                                             "encryption_drain_window)"]]


class RemovedKey(TypedDict):
    label: _Label
    objects: Annotated[int, "token objects destroyed (key pair, certificates): 0 when none was on this host's token"]


class RetiredRemoved(TypedDict):
    key: str
    removed: list[RemovedKey]


class RotationKeyStatus(TypedDict):
    label: _Label
    role: Literal["current", "successor", "retired"]
    since: Annotated[str | None, "ISO 8601; None for a key no rotation has named yet"]
    on_token: Annotated[bool, "false: not on this host's token (removed, or never here)"]
    certificate: RotationCertificate | None
    kid: NotRequired[Annotated[str | None, "jws keys not retired, encryption keys: the kid it is published (or, "
                                           "retired, still decrypts) under (None: no kid yet, without a "
                                           "certificate)"]]
    remove_after: NotRequired[Annotated[str, "retired encryption keys: when remove-retired may remove it "
                                             "([rotation] encryption_drain_window after it retired)"]]


class BankRotation(TypedDict):
    bank: str
    key: Annotated[str, "CKA_LABEL of the key whose certificate the bank gets"]
    switched_at: Annotated[str | None, "ISO 8601; None: not switched in this rotation"]


class KeyRotation(TypedDict):
    key: str
    purpose: _Purpose
    version: Annotated[int, "of the shared state; 0: never rotated"]
    updated_at: str | None
    updated_by: Annotated[str | None, "the host that took the last step"]
    keys: list[RotationKeyStatus]
    overlap_started_at: str | None
    signing_switched_at: str | None
    banks: NotRequired[Annotated[list[BankRotation], "tls keys: each bank that uses it"]]
    signing: NotRequired[Annotated[str, "jws keys: CKA_LABEL of the key that signs"]]
    signing_switch_after: NotRequired[Annotated[str | None, "jws keys: when signing may switch"]]
    retire_after: NotRequired[Annotated[str | None, "jws and encryption keys: when the old key may be retired"]]
    phase: Annotated[str, "where the rotation stands, in words"]
    next: Annotated[str, "the command of the next step"]


class RotationStatus(TypedDict):
    jwks_cache_window: Annotated[float, "[rotation] jwks_cache_window, seconds"]
    encryption_drain_window: Annotated[float, "[rotation] encryption_drain_window, seconds"]
    keys: Annotated[list[KeyRotation], "the keys the caller may see"]


@dataclasses.dataclass(frozen=True)
class StartInput:
    subject: str | None = text(1024, None)  # RFC 4514; default: the current certificate's
    alg: str | None = text(16, None)


def start(context: Context, given: StartInput) -> dict[str, Any]:
    return steps.start(context.core, context.key_config.alias, given.subject, given.alg)


@dataclasses.dataclass(frozen=True)
class ImportInput:
    # The successor's certificate, then its chain; left out: an encryption key's successor published without one.
    pem: str | None = text(MAX_CERTIFICATE_TEXT, None)

    def check(self) -> None:
        if self.pem is not None and "-----BEGIN" not in self.pem:
            raise InvalidInput("bad_field", "field 'pem' must hold a PEM certificate (-----BEGIN CERTIFICATE-----)")


def import_certificate(context: Context, given: ImportInput) -> dict[str, Any]:
    return steps.import_successor(context.core, context.key_config.alias,
                                  given.pem.encode("utf-8") if given.pem is not None else None,
                                  "the certificate given")


def request(context: Context, given: StartInput) -> dict[str, Any]:
    return steps.request(context.core, context.key_config.alias, given.subject, given.alg)


def switch_signing(context: Context, _: Nothing) -> dict[str, Any]:
    return steps.switch_signing(context.core, context.key_config.alias)


@dataclasses.dataclass(frozen=True)
class BankInput:
    bank: str = text(128)


def switch_transport(context: Context, given: BankInput) -> dict[str, Any]:
    context.log["bank"] = given.bank
    return steps.switch_transport(context.core, context.key_config.alias, given.bank)


def retire(context: Context, _: Nothing) -> dict[str, Any]:
    return steps.retire(context.core, context.key_config.alias)


@dataclasses.dataclass(frozen=True)
class RemoveInput:
    label: str | None = text(128, None)  # one retired key; default: every retired key of the alias


def remove_retired(context: Context, given: RemoveInput) -> dict[str, Any]:
    return steps.remove_retired(context.core, context.key_config.alias, given.label)


def status(context: Context, _: Nothing) -> dict[str, Any]:
    return steps.status(context.core, context.visible)


def _step(name: str, summary: str, path_input: type[Any], run: Any, result: type[Any], *,
          calls_bank: bool = False) -> Spec[Any]:
    return Spec(name, Operation.ROTATE, summary, Resource.KEY, path_input, run, access=Access.ADMIN,
                purposes=_ROTATED, calls_bank=calls_bank, result=result)


SPECS: tuple[Spec[Any], ...] = (
    _step("rotate_start", "a successor key next to the current one, and its CSR", StartInput, start,
          RotationStarted),
    _step("rotate_import", "the successor's certificate (an encryption key's: optional): the overlap starts",
          ImportInput, import_certificate, SuccessorImported),
    _step("rotate_request", "the successor's CSR to the directory, its certificate imported: the overlap starts",
          StartInput, request, SuccessorCertified, calls_bank=True),
    _step("rotate_switch_signing", "the successor signs (after the JWKS cache window)", Nothing, switch_signing,
          SigningSwitched),
    _step("rotate_switch_transport", "register the successor's certificate at a bank, then present it there",
          BankInput, switch_transport, TransportSwitched, calls_bank=True),
    _step("rotate_retire", "the old key retired (kept on the token; an encryption key's still decrypts)", Nothing,
          retire, Retired),
    _step("rotate_remove_retired", "remove retired keys from the token (an encryption key's after the drain "
          "window)", RemoveInput, remove_retired,
          RetiredRemoved),
    Spec("rotate_status", Operation.ROTATION_STATUS, "where each key's rotation stands", Resource.KEYS, Nothing,
         status, purposes=_ROTATED, result=RotationStatus),
)
