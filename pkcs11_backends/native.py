"""The few PKCS#11 calls that python-pkcs11 makes in a way we cannot use.

* ``C_Initialize``: python-pkcs11 passes NULL, which tells the module that the
  application is single-threaded; SoftHSM2 then turns its locking off and
  concurrent sessions corrupt its heap. We pass ``CKF_OS_LOCKING_OK``.
* ``C_Login``: python-pkcs11 only logs in while opening a session and raises on
  ``CKR_USER_ALREADY_LOGGED_IN``, which PKCS#11 defines as success for us (login
  is per application, and the OpenSSL engine or provider may have logged in).
* ``C_Logout`` / ``C_Finalize``: used by the recovery ladder.
* ``C_InitToken``: python-pkcs11 has no binding for it; provisioning needs it.

Most modules hand out one function list, whoever asks. Some (p11-kit's RPC client)
make a new instance, with its own state, on every ``C_GetFunctionList``: so these
calls go through python-pkcs11's own function list when one is given (see
``module.py``), and :func:`instance_per_call` tells whether the OpenSSL engine or
provider, which call ``C_GetFunctionList`` themselves, will have to log in on their own.
"""

from __future__ import annotations

import ctypes

from pkcs11_backends.returns import ReturnValue

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG

CKF_OS_LOCKING_OK = 0x00000002
CKU_USER = 1


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

# ulMaxSessionCount and ulMaxRwSessionCount: 0 is CK_EFFECTIVELY_INFINITE, all ones CK_UNAVAILABLE_INFORMATION.
UNAVAILABLE_INFORMATION = ctypes.c_ulong(-1).value


class TokenInfo(ctypes.Structure):
    _fields_ = [
        ("label", ctypes.c_char * 32),
        ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serialNumber", ctypes.c_char * 16),
        ("flags", CK_ULONG),
        ("ulMaxSessionCount", CK_ULONG),
        ("ulSessionCount", CK_ULONG),
        ("ulMaxRwSessionCount", CK_ULONG),
        ("ulRwSessionCount", CK_ULONG),
        ("ulMaxPinLen", CK_ULONG),
        ("ulMinPinLen", CK_ULONG),
        ("ulTotalPublicMemory", CK_ULONG),
        ("ulFreePublicMemory", CK_ULONG),
        ("ulTotalPrivateMemory", CK_ULONG),
        ("ulFreePrivateMemory", CK_ULONG),
        ("hardwareVersion", ctypes.c_ubyte * 2),
        ("firmwareVersion", ctypes.c_ubyte * 2),
        ("utcTime", ctypes.c_char * 16),
    ]


_GetTokenInfo = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(TokenInfo))


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
        ("C_GetTokenInfo", _GetTokenInfo),
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


def _function_list(dll: ctypes.CDLL) -> ctypes._Pointer[_FunctionList]:
    get_list = dll.C_GetFunctionList
    get_list.restype = CK_RV
    get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
    pointer = ctypes.POINTER(_FunctionList)()
    rv = get_list(ctypes.byref(pointer))
    if rv != ReturnValue.OK:
        raise OSError(f"C_GetFunctionList failed: {ReturnValue.name_of(rv)}")
    return pointer


def instance_per_call(path: str) -> bool:
    """Whether the module answers each ``C_GetFunctionList`` with a new instance (a probe, two calls)."""
    # RTLD_GLOBAL is not needed: dlopen of the same path returns the same library.
    dll = ctypes.CDLL(path)
    first, second = _function_list(dll), _function_list(dll)
    return ctypes.addressof(first.contents) != ctypes.addressof(second.contents)


class NativeModule:
    """A ctypes view of one PKCS#11 module's function list (``function_list``: an address, or our own)."""

    def __init__(self, path: str, function_list: int | None = None) -> None:
        self._dll = ctypes.CDLL(path)
        if function_list is None:
            self._functions = _function_list(self._dll).contents
        else:
            self._functions = _FunctionList.from_address(function_list)
        if self._functions.version_major not in (2, 3):
            raise OSError(f"{path} gave a function list of unknown version {self._functions.version_major}")
        # Kept alive as long as the module may read it (PKCS#11 says nothing about copying pReserved).
        self._init_args: ctypes.Array[ctypes.c_char] | None = None

    def initialize(self, init_args: bytes | None = None) -> int:
        """C_Initialize with OS locking and ``init_args`` as pReserved (NUL-terminated); the raw CK_RV."""
        if init_args is not None:
            self._init_args = ctypes.create_string_buffer(init_args)
        reserved = ctypes.cast(self._init_args, ctypes.c_void_p) if self._init_args is not None else None
        args = _InitializeArgs(None, None, None, None, CKF_OS_LOCKING_OK, reserved)
        return int(self._functions.C_Initialize(ctypes.addressof(args)))

    def token_info(self, slot_id: int) -> TokenInfo:
        """C_GetTokenInfo: python-pkcs11's Token leaves out the session limits."""
        info = TokenInfo()
        rv = self._functions.C_GetTokenInfo(slot_id, ctypes.byref(info))
        if rv != ReturnValue.OK:
            raise OSError(f"C_GetTokenInfo failed: {ReturnValue.name_of(rv)}")
        return info

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
