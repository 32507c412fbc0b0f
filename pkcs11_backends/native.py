"""The few PKCS#11 calls that python-pkcs11 makes in a way we cannot use.

* ``C_Initialize``: python-pkcs11 passes NULL, which tells the module that the
  application is single-threaded; SoftHSM2 then turns its locking off and
  concurrent sessions corrupt its heap. We pass ``CKF_OS_LOCKING_OK``.
* ``C_Login``: python-pkcs11 only logs in while opening a session and raises on
  ``CKR_USER_ALREADY_LOGGED_IN``, which PKCS#11 defines as success for us (login
  is per application, and the OpenSSL engine or provider may have logged in).
* ``C_Logout`` / ``C_Finalize``: used by the recovery ladder.
* ``C_InitToken``: python-pkcs11 has no binding for it; provisioning needs it.

The module is opened with ``dlopen`` on the same path as python-pkcs11 and the
OpenSSL engine/provider, so all three share one module instance.
"""

from __future__ import annotations

import ctypes
import enum

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG

CKF_OS_LOCKING_OK = 0x00000002
CKU_USER = 1


class ReturnValue(enum.IntEnum):
    OK = 0x000
    GENERAL_ERROR = 0x005
    FUNCTION_FAILED = 0x006
    ARGUMENTS_BAD = 0x007
    DEVICE_ERROR = 0x030
    DEVICE_REMOVED = 0x032
    PIN_INCORRECT = 0x0A0
    PIN_INVALID = 0x0A1
    PIN_LEN_RANGE = 0x0A2
    PIN_EXPIRED = 0x0A3
    PIN_LOCKED = 0x0A4
    SESSION_CLOSED = 0x0B0
    SESSION_HANDLE_INVALID = 0x0B3
    TOKEN_NOT_PRESENT = 0x0E0
    TOKEN_NOT_RECOGNIZED = 0x0E1
    USER_ALREADY_LOGGED_IN = 0x100
    USER_NOT_LOGGED_IN = 0x101
    USER_PIN_NOT_INITIALIZED = 0x102
    USER_ANOTHER_ALREADY_LOGGED_IN = 0x104
    CRYPTOKI_NOT_INITIALIZED = 0x190
    CRYPTOKI_ALREADY_INITIALIZED = 0x191

    @classmethod
    def name_of(cls, rv: int) -> str:
        try:
            return "CKR_" + cls(rv).name
        except ValueError:
            return f"CKR_0x{rv:08X}"


class _InitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", CK_ULONG),
        ("pReserved", ctypes.c_void_p),
    ]


_Initialize = ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p)
_Finalize = ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p)
_Login = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG)
_Logout = ctypes.CFUNCTYPE(CK_RV, CK_ULONG)
_InitToken = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.c_char_p, CK_ULONG, ctypes.c_char_p)


class _FunctionList(ctypes.Structure):
    # The head of CK_FUNCTION_LIST up to C_Logout; the rest is never read here.
    _fields_ = [
        ("version_major", ctypes.c_ubyte),
        ("version_minor", ctypes.c_ubyte),
        ("C_Initialize", _Initialize),
        ("C_Finalize", _Finalize),
        ("C_GetInfo", ctypes.c_void_p),
        ("C_GetFunctionList", ctypes.c_void_p),
        ("C_GetSlotList", ctypes.c_void_p),
        ("C_GetSlotInfo", ctypes.c_void_p),
        ("C_GetTokenInfo", ctypes.c_void_p),
        ("C_GetMechanismList", ctypes.c_void_p),
        ("C_GetMechanismInfo", ctypes.c_void_p),
        ("C_InitToken", _InitToken),
        ("C_InitPIN", ctypes.c_void_p),
        ("C_SetPIN", ctypes.c_void_p),
        ("C_OpenSession", ctypes.c_void_p),
        ("C_CloseSession", ctypes.c_void_p),
        ("C_CloseAllSessions", ctypes.c_void_p),
        ("C_GetSessionInfo", ctypes.c_void_p),
        ("C_GetOperationState", ctypes.c_void_p),
        ("C_SetOperationState", ctypes.c_void_p),
        ("C_Login", _Login),
        ("C_Logout", _Logout),
    ]


class NativeModule:
    """A ctypes view of one PKCS#11 module's function list."""

    def __init__(self, path: str) -> None:
        # RTLD_GLOBAL is not needed: dlopen of the same path returns the same instance.
        self._dll = ctypes.CDLL(path)
        get_list = self._dll.C_GetFunctionList
        get_list.restype = CK_RV
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
        pointer = ctypes.POINTER(_FunctionList)()
        rv = get_list(ctypes.byref(pointer))
        if rv != ReturnValue.OK:
            raise OSError(f"C_GetFunctionList failed: {ReturnValue.name_of(rv)}")
        self._functions = pointer.contents

    def initialize(self) -> int:
        """C_Initialize with OS locking; returns the raw CK_RV."""
        args = _InitializeArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
        return int(self._functions.C_Initialize(ctypes.addressof(args)))

    def finalize(self) -> int:
        return int(self._functions.C_Finalize(None))

    def login(self, session_handle: int, pin: bytes) -> int:
        return int(self._functions.C_Login(session_handle, CKU_USER, pin, len(pin)))

    def logout(self, session_handle: int) -> int:
        return int(self._functions.C_Logout(session_handle))

    def init_token(self, slot_id: int, so_pin: bytes, label: str) -> int:
        padded = label.encode("utf-8").ljust(32, b" ")
        if len(padded) > 32:
            raise ValueError("a token label is at most 32 bytes")
        return int(self._functions.C_InitToken(slot_id, so_pin, len(so_pin), padded))
