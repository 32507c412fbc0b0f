"""Key rotation (agent/rotation/steps.py): each step an admin's operation; the status view may be granted.

A transport key's successor CSR repeats the current certificate's subject (no caller chooses what the directory
certifies for the agent's TLS identity); a jws key's may name another subject.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.config import KeyPurpose
from agent.operations.core import Context
from agent.operations.inputs import InvalidInput, Nothing, text
from agent.operations.spec import Access, Operation, Resource, Spec
from agent.rotation import steps

MAX_CERTIFICATE_TEXT = 1 << 20
_ROTATED = frozenset({KeyPurpose.TLS, KeyPurpose.JWS})


@dataclasses.dataclass(frozen=True)
class StartInput:
    subject: str | None = text(1024, None)  # RFC 4514; default: the current certificate's
    alg: str | None = text(16, None)


def start(context: Context, given: StartInput) -> dict[str, Any]:
    return steps.start(context.core, context.key_config.alias, given.subject, given.alg)


@dataclasses.dataclass(frozen=True)
class ImportInput:
    pem: str = text(MAX_CERTIFICATE_TEXT)  # the successor's certificate, then its chain

    def check(self) -> None:
        if "-----BEGIN" not in self.pem:
            raise InvalidInput("bad_field", "field 'pem' must hold a PEM certificate (-----BEGIN CERTIFICATE-----)")


def import_certificate(context: Context, given: ImportInput) -> dict[str, Any]:
    return steps.import_successor(context.core, context.key_config.alias, given.pem.encode("utf-8"),
                                  "the certificate given")


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


def _step(name: str, summary: str, path_input: type[Any], run: Any, *, calls_bank: bool = False) -> Spec[Any]:
    return Spec(name, Operation.ROTATE, summary, Resource.KEY, path_input, run, access=Access.ADMIN,
                purposes=_ROTATED, calls_bank=calls_bank)


SPECS: tuple[Spec[Any], ...] = (
    _step("rotate_start", "a successor key next to the current one, and its CSR", StartInput, start),
    _step("rotate_import", "the successor's certificate: the overlap starts", ImportInput, import_certificate),
    _step("rotate_switch_signing", "the successor signs (after the JWKS cache window)", Nothing, switch_signing),
    _step("rotate_switch_transport", "register the successor's certificate at a bank, then present it there",
          BankInput, switch_transport, calls_bank=True),
    _step("rotate_retire", "the old key retired (kept on the token)", Nothing, retire),
    _step("rotate_remove_retired", "remove retired keys from the token", RemoveInput, remove_retired),
    Spec("rotate_status", Operation.ROTATION_STATUS, "where each key's rotation stands", Resource.KEYS, Nothing,
         status, purposes=_ROTATED),
)
