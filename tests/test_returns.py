"""PKCS#11 return values: each has its CKR_ name, and its kind decides what the pool does."""

from __future__ import annotations

import pkcs11
import pytest

from pkcs11_backends.returns import Fault, ReturnValue, describe, fault_of, rv_of


def test_every_standard_code_has_its_name() -> None:
    assert ReturnValue.name_of(0x005) == "CKR_GENERAL_ERROR"
    assert ReturnValue.name_of(0x0F0) == "CKR_UNWRAPPING_KEY_HANDLE_INVALID"
    assert ReturnValue.name_of(0x1C3) == "CKR_PIN_TOO_WEAK"  # 3.0
    assert ReturnValue.name_of(0x209) == "CKR_PARAMETER_SET_NOT_SUPPORTED"  # 3.2
    assert ReturnValue.name_of(0x8000_0042) == "CKR_VENDOR_DEFINED+0x42"
    assert ReturnValue.name_of(0x333) == "CKR_0x00000333 (not in PKCS#11 3.2)"
    assert len({member.name for member in ReturnValue}) == len(ReturnValue) >= 100


@pytest.mark.parametrize(("exc", "name"), [
    (pkcs11.exceptions.GeneralError(), "CKR_GENERAL_ERROR"),
    (pkcs11.exceptions.TemplateInconsistent(), "CKR_TEMPLATE_INCONSISTENT"),
    (pkcs11.exceptions.SessionHandleInvalid(), "CKR_SESSION_HANDLE_INVALID"),
    (pkcs11.PKCS11Error("Unmapped error code 0x190"), "CKR_CRYPTOKI_NOT_INITIALIZED"),
])
def test_python_pkcs11_errors_are_named_by_their_code(exc: pkcs11.PKCS11Error, name: str) -> None:
    assert describe(exc) == name


def test_a_failed_call_is_not_a_token_that_went_away() -> None:
    assert fault_of(ReturnValue.GENERAL_ERROR) is Fault.MODULE
    assert fault_of(ReturnValue.FUNCTION_FAILED) is Fault.MODULE
    assert fault_of(ReturnValue.DEVICE_REMOVED) is Fault.STALE
    assert fault_of(ReturnValue.CRYPTOKI_NOT_INITIALIZED) is Fault.STALE
    assert fault_of(ReturnValue.TEMPLATE_INCONSISTENT) is Fault.REFUSED
    assert rv_of(pkcs11.PKCS11Error("not from a module")) is None
