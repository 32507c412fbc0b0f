"""Loading a PKCS#11 module once per process, initialised for threads.

python-pkcs11 is used for everything except ``C_Initialize``/``C_Finalize``
(see ``native.py``): we subclass its ``lib`` so its own ``initialize`` becomes ours,
and make those calls on python-pkcs11's own function list, so that a module that
hands out a new instance per ``C_GetFunctionList`` (p11-kit's RPC client) is still
one instance for both.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

import pkcs11
from pkcs11 import _pkcs11

from pkcs11_backends.errors import ModuleLoadError, TokenNotFoundError, TokenUnavailableError
from pkcs11_backends.native import NativeModule, TokenInfo, instance_per_call
from pkcs11_backends.returns import ReturnValue
from pkcs11_backends.uri import Pkcs11Uri


def _function_list_of(lib: _pkcs11.lib) -> int | None:
    """The address of python-pkcs11's own CK_FUNCTION_LIST, or None if its object layout is not the known one.

    python-pkcs11 (0.9, 0.10) keeps it, unexposed, as the first field of ``HasFuncList``
    after the object header, followed by its 3.0 and 3.2 lists: the size check proves the layout.
    """
    base: type | None = getattr(_pkcs11, "HasFuncList", None)
    pointer = ctypes.sizeof(ctypes.c_void_p)
    if base is None or not isinstance(lib, base) or base.__basicsize__ != object.__basicsize__ + 3 * pointer:
        return None
    address = ctypes.c_void_p.from_address(id(lib) + object.__basicsize__).value
    return int(address) if address else None


class _LockingLib(_pkcs11.lib):
    """python-pkcs11's library object, initialised with ``CKF_OS_LOCKING_OK`` and the configured init args."""

    init_args: bytes | None
    so_path: str
    native: NativeModule

    def initialize(self) -> None:
        self.native = NativeModule(self.so_path, _function_list_of(self))
        rv = self.native.initialize(self.init_args)
        # Another user of the same module instance in this process (the OpenSSL
        # engine or provider) may have initialised it first: that is fine, as
        # both of them ask for locking too.
        if rv not in (ReturnValue.OK, ReturnValue.CRYPTOKI_ALREADY_INITIALIZED):
            hint = ("the module may need [pkcs11] init_args (its C_Initialize reserved string, see its manual), "
                    "or its connection limit is reached (tpm2-abrmd --max-connections; a network HSM's clients)"
                    if rv in (ReturnValue.ARGUMENTS_BAD, ReturnValue.GENERAL_ERROR, ReturnValue.FUNCTION_FAILED)
                    else None)
            raise ModuleLoadError(f"C_Initialize of {self.so_path} failed: {ReturnValue.name_of(rv)}", hint=hint)


def _make_lib(path: str, init_args: bytes | None) -> _LockingLib:
    # python-pkcs11 calls initialize() from __init__, before anything can be set on
    # the object: a per-call subclass carries what it needs.
    bound = type("_BoundLockingLib", (_LockingLib,), {"init_args": init_args, "so_path": path})
    lib: _LockingLib = bound(path)
    return lib


class TokenSelector:
    """How the config names a token: a label, ``serial:NNN``, or a ``pkcs11:`` URI."""

    def __init__(self, label: str | None = None, serial: str | None = None) -> None:
        if label is None and serial is None:
            raise TokenNotFoundError("no token named: set [pkcs11] token to a label, serial:NNN or pkcs11:token=...")
        self.label = label
        self.serial = serial

    @classmethod
    def parse(cls, text: str) -> TokenSelector:
        if text.startswith("pkcs11:"):
            uri = Pkcs11Uri.parse(text)
            return cls(label=uri.token, serial=uri.serial)
        if text.startswith("serial:"):
            return cls(serial=text[len("serial:"):])
        return cls(label=text)

    def __str__(self) -> str:
        if self.serial is not None and self.label is None:
            return f"serial:{self.serial}"
        return repr(self.label) if self.serial is None else f"{self.label!r} (serial {self.serial})"

    def matches(self, token: pkcs11.Token) -> bool:
        if self.label is not None and token.label != self.label:
            return False
        return self.serial is None or token.serial.decode("ascii", "replace").strip() == self.serial


class Module:
    """One loaded PKCS#11 module. Use :meth:`load`; never construct twice per path."""

    _loaded: dict[str, Module] = {}
    _lock = threading.Lock()

    def __init__(self, path: str, init_args: bytes | None = None) -> None:
        self.path = path
        self.init_args = init_args
        # Probed before python-pkcs11 loads it: whether the OpenSSL engine or provider,
        # which ask the module for their own function list, get an instance of their own.
        self.instance_per_call = instance_per_call(path)
        self.lib = _make_lib(path, init_args)
        self.native = self.lib.native
        # Set by the session pool once its login worked, for the users of the module that
        # must log in on an instance of their own (see ``instance_per_call``).
        self.login_pin: Callable[[], bytes] | None = None
        self.pid = os.getpid()
        # Bumped by every C_Finalize: handles held elsewhere in the process (the OpenSSL
        # engine's sessions and keys) are worthless once it changes.
        self.generation = 0

    @classmethod
    def load(cls, path: str, init_args: bytes | None = None) -> Module:
        real = os.path.realpath(path)
        with cls._lock:
            module = cls._loaded.get(real)
            if module is not None:
                if module.pid != os.getpid():
                    raise ModuleLoadError(
                        "PKCS#11 module used across fork()",
                        hint="start workers before loading PKCS#11 (a forked child must not reuse the parent's module)",
                    )
                if init_args is not None and init_args != module.init_args:
                    raise ModuleLoadError(f"{path} is already initialised in this process with other init_args",
                                          hint="one process serves one [pkcs11] configuration")
                return module
            if not os.path.exists(real):
                raise ModuleLoadError(f"PKCS#11 module not found: {path}")
            try:
                module = cls(real, init_args)
            except OSError as exc:
                raise ModuleLoadError(f"cannot load PKCS#11 module {path}: {exc}") from exc
            except pkcs11.PKCS11Error as exc:
                raise ModuleLoadError(f"cannot initialise PKCS#11 module {path}: {exc!r}") from exc
            cls._loaded[real] = module
            return module

    @classmethod
    def loaded(cls, path: str) -> Module | None:
        """The module already loaded from ``path`` in this process, if any."""
        with cls._lock:
            return cls._loaded.get(os.path.realpath(path))

    @property
    def description(self) -> str:
        version = ".".join(map(str, self.lib.library_version))
        return f"{self.lib.manufacturer_id} {self.lib.library_description} {version}"

    def tokens(self) -> list[pkcs11.Token]:
        try:
            return [slot.get_token() for slot in self.lib.get_slots(token_present=True)]
        except pkcs11.PKCS11Error as exc:
            raise TokenUnavailableError(f"cannot list tokens of {self.path}: {exc!r}") from exc

    def find_token(self, selector: TokenSelector) -> pkcs11.Token:
        tokens = self.tokens()
        found = [t for t in tokens if selector.matches(t)]
        if not found:
            present = ", ".join(repr(t.label) for t in tokens) or "none"
            raise TokenNotFoundError(f"no token {selector} in {self.path} (present: {present})")
        if len(found) > 1:
            raise TokenNotFoundError(
                f"{len(found)} tokens match {selector}",
                hint="name the token by serial:NNN in [pkcs11] token",
            )
        return found[0]

    def token_info(self, token: pkcs11.Token) -> TokenInfo:
        try:
            return self.native.token_info(token.slot.slot_id)
        except OSError as exc:
            raise TokenUnavailableError(f"cannot read token {token.label!r} of {self.path}: {exc}") from exc

    def reinitialize(self) -> None:
        """Finalize and initialise again: the last rung of the recovery ladder.

        Every session and object handle of this process dies with it, the OpenSSL
        engine's or provider's included.
        """
        self.native.finalize()
        self.generation += 1
        rv = self.native.initialize()
        if rv not in (ReturnValue.OK, ReturnValue.CRYPTOKI_ALREADY_INITIALIZED):
            raise TokenUnavailableError(f"C_Initialize failed after finalize: {ReturnValue.name_of(rv)}")
