"""PKCS#11 return values: every code of the standard (v2.40 to 3.2) by name, and what each kind means to us.

A module's answer reaches the operator as one line with its ``CKR_`` name; the pool
decides what to do about it from its :class:`Fault` kind, never from python-pkcs11's
exception names alone (``CKR_GENERAL_ERROR`` is a failed call, not a token that went away).
"""

from __future__ import annotations

import enum
import re

import pkcs11

VENDOR_DEFINED = 0x80000000


class ReturnValue(enum.IntEnum):
    OK = 0x000
    CANCEL = 0x001
    HOST_MEMORY = 0x002
    SLOT_ID_INVALID = 0x003
    GENERAL_ERROR = 0x005
    FUNCTION_FAILED = 0x006
    ARGUMENTS_BAD = 0x007
    NO_EVENT = 0x008
    NEED_TO_CREATE_THREADS = 0x009
    CANT_LOCK = 0x00A
    ATTRIBUTE_READ_ONLY = 0x010
    ATTRIBUTE_SENSITIVE = 0x011
    ATTRIBUTE_TYPE_INVALID = 0x012
    ATTRIBUTE_VALUE_INVALID = 0x013
    ACTION_PROHIBITED = 0x01B
    DATA_INVALID = 0x020
    DATA_LEN_RANGE = 0x021
    DEVICE_ERROR = 0x030
    DEVICE_MEMORY = 0x031
    DEVICE_REMOVED = 0x032
    ENCRYPTED_DATA_INVALID = 0x040
    ENCRYPTED_DATA_LEN_RANGE = 0x041
    FUNCTION_CANCELED = 0x050
    FUNCTION_NOT_PARALLEL = 0x051
    FUNCTION_NOT_SUPPORTED = 0x054
    KEY_HANDLE_INVALID = 0x060
    KEY_SIZE_RANGE = 0x062
    KEY_TYPE_INCONSISTENT = 0x063
    KEY_NOT_NEEDED = 0x064
    KEY_CHANGED = 0x065
    KEY_NEEDED = 0x066
    KEY_INDIGESTIBLE = 0x067
    KEY_FUNCTION_NOT_PERMITTED = 0x068
    KEY_NOT_WRAPPABLE = 0x069
    KEY_UNEXTRACTABLE = 0x06A
    MECHANISM_INVALID = 0x070
    MECHANISM_PARAM_INVALID = 0x071
    OBJECT_HANDLE_INVALID = 0x082
    OPERATION_ACTIVE = 0x090
    OPERATION_NOT_INITIALIZED = 0x091
    PIN_INCORRECT = 0x0A0
    PIN_INVALID = 0x0A1
    PIN_LEN_RANGE = 0x0A2
    PIN_EXPIRED = 0x0A3
    PIN_LOCKED = 0x0A4
    SESSION_CLOSED = 0x0B0
    SESSION_COUNT = 0x0B1
    SESSION_HANDLE_INVALID = 0x0B3
    SESSION_PARALLEL_NOT_SUPPORTED = 0x0B4
    SESSION_READ_ONLY = 0x0B5
    SESSION_EXISTS = 0x0B6
    SESSION_READ_ONLY_EXISTS = 0x0B7
    SESSION_READ_WRITE_SO_EXISTS = 0x0B8
    SIGNATURE_INVALID = 0x0C0
    SIGNATURE_LEN_RANGE = 0x0C1
    TEMPLATE_INCOMPLETE = 0x0D0
    TEMPLATE_INCONSISTENT = 0x0D1
    TOKEN_NOT_PRESENT = 0x0E0
    TOKEN_NOT_RECOGNIZED = 0x0E1
    TOKEN_WRITE_PROTECTED = 0x0E2
    UNWRAPPING_KEY_HANDLE_INVALID = 0x0F0
    UNWRAPPING_KEY_SIZE_RANGE = 0x0F1
    UNWRAPPING_KEY_TYPE_INCONSISTENT = 0x0F2
    USER_ALREADY_LOGGED_IN = 0x100
    USER_NOT_LOGGED_IN = 0x101
    USER_PIN_NOT_INITIALIZED = 0x102
    USER_TYPE_INVALID = 0x103
    USER_ANOTHER_ALREADY_LOGGED_IN = 0x104
    USER_TOO_MANY_TYPES = 0x105
    WRAPPED_KEY_INVALID = 0x110
    WRAPPED_KEY_LEN_RANGE = 0x112
    WRAPPING_KEY_HANDLE_INVALID = 0x113
    WRAPPING_KEY_SIZE_RANGE = 0x114
    WRAPPING_KEY_TYPE_INCONSISTENT = 0x115
    RANDOM_SEED_NOT_SUPPORTED = 0x120
    RANDOM_NO_RNG = 0x121
    DOMAIN_PARAMS_INVALID = 0x130
    CURVE_NOT_SUPPORTED = 0x140
    BUFFER_TOO_SMALL = 0x150
    SAVED_STATE_INVALID = 0x160
    INFORMATION_SENSITIVE = 0x170
    STATE_UNSAVEABLE = 0x180
    CRYPTOKI_NOT_INITIALIZED = 0x190
    CRYPTOKI_ALREADY_INITIALIZED = 0x191
    MUTEX_BAD = 0x1A0
    MUTEX_NOT_LOCKED = 0x1A1
    NEW_PIN_MODE = 0x1B0
    NEXT_OTP = 0x1B1
    EXCEEDED_MAX_ITERATIONS = 0x1C0
    FIPS_SELF_TEST_FAILED = 0x1C1
    LIBRARY_LOAD_FAILED = 0x1C2
    PIN_TOO_WEAK = 0x1C3
    PUBLIC_KEY_INVALID = 0x1C4
    FUNCTION_REJECTED = 0x200
    TOKEN_RESOURCE_EXCEEDED = 0x201
    OPERATION_CANCEL_FAILED = 0x202
    KEY_EXHAUSTED = 0x203
    PENDING = 0x204
    SESSION_ASYNC_NOT_SUPPORTED = 0x205
    SEED_RANDOM_REQUIRED = 0x206
    OPERATION_NOT_VALIDATED = 0x207
    TOKEN_NOT_INITIALIZED = 0x208
    PARAMETER_SET_NOT_SUPPORTED = 0x209

    @classmethod
    def name_of(cls, rv: int) -> str:
        if rv >= VENDOR_DEFINED:
            return f"CKR_VENDOR_DEFINED+0x{rv - VENDOR_DEFINED:X}"
        try:
            return "CKR_" + cls(rv).name
        except ValueError:
            return f"CKR_0x{rv:08X} (not in PKCS#11 3.2)"


class Fault(enum.Enum):
    """What a failed call says about the module's state."""

    STALE = "stale"  # handles, login or the device are gone: new sessions, log in again (or start afresh)
    MODULE = "module"  # the module failed this call; only when it keeps failing is the module started afresh
    REFUSED = "refused"  # this request was refused (template, mechanism, data, PIN): the caller's to fix


_STALE = frozenset({
    ReturnValue.SESSION_HANDLE_INVALID, ReturnValue.SESSION_CLOSED, ReturnValue.DEVICE_REMOVED,
    ReturnValue.DEVICE_ERROR, ReturnValue.TOKEN_NOT_PRESENT, ReturnValue.TOKEN_NOT_RECOGNIZED,
    ReturnValue.OBJECT_HANDLE_INVALID, ReturnValue.KEY_HANDLE_INVALID, ReturnValue.USER_NOT_LOGGED_IN,
    ReturnValue.CRYPTOKI_NOT_INITIALIZED, ReturnValue.SLOT_ID_INVALID,
})
_MODULE = frozenset({
    ReturnValue.GENERAL_ERROR, ReturnValue.FUNCTION_FAILED, ReturnValue.DEVICE_MEMORY, ReturnValue.HOST_MEMORY,
    ReturnValue.CANT_LOCK, ReturnValue.FUNCTION_CANCELED, ReturnValue.TOKEN_RESOURCE_EXCEEDED,
})


def fault_of(rv: int) -> Fault:
    if rv in _STALE:
        return Fault.STALE
    if rv in _MODULE:
        return Fault.MODULE
    return Fault.REFUSED


# python-pkcs11 raises one class per code (its map_rv_to_error) and keeps no code on the exception.
_BY_EXCEPTION = {
    "AttributeTypeInvalid": ReturnValue.ATTRIBUTE_TYPE_INVALID,
    "AttributeValueInvalid": ReturnValue.ATTRIBUTE_VALUE_INVALID,
    "AttributeReadOnly": ReturnValue.ATTRIBUTE_READ_ONLY,
    "AttributeSensitive": ReturnValue.ATTRIBUTE_SENSITIVE,
    "ArgumentsBad": ReturnValue.ARGUMENTS_BAD,
    "DataInvalid": ReturnValue.DATA_INVALID,
    "DataLenRange": ReturnValue.DATA_LEN_RANGE,
    "DomainParamsInvalid": ReturnValue.DOMAIN_PARAMS_INVALID,
    "DeviceError": ReturnValue.DEVICE_ERROR,
    "DeviceMemory": ReturnValue.DEVICE_MEMORY,
    "DeviceRemoved": ReturnValue.DEVICE_REMOVED,
    "EncryptedDataInvalid": ReturnValue.ENCRYPTED_DATA_INVALID,
    "EncryptedDataLenRange": ReturnValue.ENCRYPTED_DATA_LEN_RANGE,
    "ExceededMaxIterations": ReturnValue.EXCEEDED_MAX_ITERATIONS,
    "FunctionCancelled": ReturnValue.FUNCTION_CANCELED,
    "FunctionFailed": ReturnValue.FUNCTION_FAILED,
    "FunctionRejected": ReturnValue.FUNCTION_REJECTED,
    "FunctionNotSupported": ReturnValue.FUNCTION_NOT_SUPPORTED,
    "KeyHandleInvalid": ReturnValue.KEY_HANDLE_INVALID,
    "KeyIndigestible": ReturnValue.KEY_INDIGESTIBLE,
    "KeyNeeded": ReturnValue.KEY_NEEDED,
    "KeyNotNeeded": ReturnValue.KEY_NOT_NEEDED,
    "KeySizeRange": ReturnValue.KEY_SIZE_RANGE,
    "KeyNotWrappable": ReturnValue.KEY_NOT_WRAPPABLE,
    "KeyTypeInconsistent": ReturnValue.KEY_TYPE_INCONSISTENT,
    "KeyUnextractable": ReturnValue.KEY_UNEXTRACTABLE,
    "GeneralError": ReturnValue.GENERAL_ERROR,
    "HostMemory": ReturnValue.HOST_MEMORY,
    "MechanismInvalid": ReturnValue.MECHANISM_INVALID,
    "MechanismParamInvalid": ReturnValue.MECHANISM_PARAM_INVALID,
    "NoEvent": ReturnValue.NO_EVENT,
    "ObjectHandleInvalid": ReturnValue.OBJECT_HANDLE_INVALID,
    "OperationActive": ReturnValue.OPERATION_ACTIVE,
    "OperationNotInitialized": ReturnValue.OPERATION_NOT_INITIALIZED,
    "PinExpired": ReturnValue.PIN_EXPIRED,
    "PinIncorrect": ReturnValue.PIN_INCORRECT,
    "PinInvalid": ReturnValue.PIN_INVALID,
    "PinLenRange": ReturnValue.PIN_LEN_RANGE,
    "PinLocked": ReturnValue.PIN_LOCKED,
    "PinTooWeak": ReturnValue.PIN_TOO_WEAK,
    "PublicKeyInvalid": ReturnValue.PUBLIC_KEY_INVALID,
    "RandomNoRNG": ReturnValue.RANDOM_NO_RNG,
    "RandomSeedNotSupported": ReturnValue.RANDOM_SEED_NOT_SUPPORTED,
    "SessionClosed": ReturnValue.SESSION_CLOSED,
    "SessionCount": ReturnValue.SESSION_COUNT,
    "SessionExists": ReturnValue.SESSION_EXISTS,
    "SessionHandleInvalid": ReturnValue.SESSION_HANDLE_INVALID,
    "SessionReadOnly": ReturnValue.SESSION_READ_ONLY,
    "SessionReadOnlyExists": ReturnValue.SESSION_READ_ONLY_EXISTS,
    "SessionReadWriteSOExists": ReturnValue.SESSION_READ_WRITE_SO_EXISTS,
    "SignatureLenRange": ReturnValue.SIGNATURE_LEN_RANGE,
    "SignatureInvalid": ReturnValue.SIGNATURE_INVALID,
    "TemplateIncomplete": ReturnValue.TEMPLATE_INCOMPLETE,
    "TemplateInconsistent": ReturnValue.TEMPLATE_INCONSISTENT,
    "SlotIDInvalid": ReturnValue.SLOT_ID_INVALID,
    "TokenNotPresent": ReturnValue.TOKEN_NOT_PRESENT,
    "TokenNotRecognised": ReturnValue.TOKEN_NOT_RECOGNIZED,
    "TokenWriteProtected": ReturnValue.TOKEN_WRITE_PROTECTED,
    "UnwrappingKeyHandleInvalid": ReturnValue.UNWRAPPING_KEY_HANDLE_INVALID,
    "UnwrappingKeySizeRange": ReturnValue.UNWRAPPING_KEY_SIZE_RANGE,
    "UnwrappingKeyTypeInconsistent": ReturnValue.UNWRAPPING_KEY_TYPE_INCONSISTENT,
    "UserNotLoggedIn": ReturnValue.USER_NOT_LOGGED_IN,
    "UserAlreadyLoggedIn": ReturnValue.USER_ALREADY_LOGGED_IN,
    "AnotherUserAlreadyLoggedIn": ReturnValue.USER_ANOTHER_ALREADY_LOGGED_IN,
    "UserPinNotInitialized": ReturnValue.USER_PIN_NOT_INITIALIZED,
    "UserTooManyTypes": ReturnValue.USER_TOO_MANY_TYPES,
    "WrappedKeyInvalid": ReturnValue.WRAPPED_KEY_INVALID,
    "WrappedKeyLenRange": ReturnValue.WRAPPED_KEY_LEN_RANGE,
    "WrappingKeyHandleInvalid": ReturnValue.WRAPPING_KEY_HANDLE_INVALID,
    "WrappingKeySizeRange": ReturnValue.WRAPPING_KEY_SIZE_RANGE,
    "WrappingKeyTypeInconsistent": ReturnValue.WRAPPING_KEY_TYPE_INCONSISTENT,
}
_UNMAPPED = re.compile(r"0x([0-9a-fA-F]+)")


def rv_of(exc: pkcs11.PKCS11Error) -> int | None:
    """The CK_RV behind a python-pkcs11 exception, or None if it was not a module's answer."""
    for cls in type(exc).__mro__:
        found = _BY_EXCEPTION.get(cls.__name__)
        if found is not None:
            return int(found)
    match = _UNMAPPED.search(str(exc)) if type(exc) is pkcs11.PKCS11Error else None
    return int(match.group(1), 16) if match else None


def describe(exc: pkcs11.PKCS11Error) -> str:
    """``CKR_NAME`` for a module's answer, else python-pkcs11's own words, on one line."""
    rv = rv_of(exc)
    if rv is not None:
        return ReturnValue.name_of(rv)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
