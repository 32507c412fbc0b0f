"""The process's OpenSSL: proof that pyOpenSSL shares the system libssl, and where the
PKCS#11 engine (libp11) and provider (pkcs11-provider) live.

A token key reaches pyOpenSSL as an ``EVP_PKEY*`` created by the system libcrypto
(engine or provider); that only works when pyOpenSSL's binding is linked to that
same shared library, not to a copy inside a PyPI wheel.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import glob
import os
import threading
from pathlib import Path
from typing import Protocol

from pkcs11_backends.errors import Pkcs11Error
from pkcs11_backends.module import Module

_SYSTEM_PREFIXES = ("/usr/lib/", "/lib/", "/usr/lib64/", "/lib64/", "/usr/local/lib/")
_MULTIARCH_GLOBS = ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib")


class OpenSSLLinkageError(Pkcs11Error):
    hint = ("recreate the venv from /usr/bin/python3 with --system-site-packages and the distribution's "
            "python3-openssl/python3-cryptography (`rm -rf .venv && make setup`); never pip-install cryptography")


@dataclasses.dataclass(frozen=True)
class Linkage:
    libssl: str
    libcrypto: str
    version: str


def _mapped(name: str) -> set[str]:
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    return {p for p in paths if os.path.basename(p).startswith(name)}


def check_linkage() -> Linkage:
    """Import pyOpenSSL and prove that it runs on the system's shared libssl/libcrypto."""
    try:
        import OpenSSL.SSL
    except ImportError as exc:
        raise OpenSSLLinkageError(f"pyOpenSSL is not importable: {exc}") from exc
    libssl, libcrypto = _mapped("libssl.so"), _mapped("libcrypto.so")
    foreign = sorted(p for p in libssl | libcrypto if not p.startswith(_SYSTEM_PREFIXES))
    if foreign:
        raise OpenSSLLinkageError(f"pyOpenSSL runs on a private OpenSSL copy: {', '.join(foreign)}")
    if len(libssl) != 1 or len(libcrypto) != 1:
        found = ", ".join(sorted(libssl | libcrypto)) or "none"
        raise OpenSSLLinkageError(
            f"pyOpenSSL is not linked to one shared system OpenSSL (mapped: {found}); "
            "a statically linked cryptography wheel cannot use token keys")
    version = OpenSSL.SSL.OpenSSL_version(OpenSSL.SSL.OPENSSL_VERSION).decode("ascii", "replace")
    return Linkage(libssl.pop(), libcrypto.pop(), version)


def libcrypto() -> ctypes.CDLL:
    """The system libcrypto, as already mapped into this process by pyOpenSSL."""
    return ctypes.CDLL(check_linkage().libcrypto)


def libssl() -> ctypes.CDLL:
    return ctypes.CDLL(check_linkage().libssl)


def find_engine() -> Path | None:
    """libp11's OpenSSL engine (Debian: libengine-pkcs11-openssl)."""
    for pattern in (f"{d}/engines-3/pkcs11.so" for d in _MULTIARCH_GLOBS):
        for hit in sorted(glob.glob(pattern)):
            return Path(hit)
    return None


def find_provider() -> Path | None:
    """pkcs11-provider (Debian 13: pkcs11-provider)."""
    for pattern in (f"{d}/ossl-modules/pkcs11.so" for d in _MULTIARCH_GLOBS):
        for hit in sorted(glob.glob(pattern)):
            return Path(hit)
    return None


# -- token keys as EVP_PKEY* ----------------------------------------------------
#
# API (stable; the transport layer and others build on it):
#
#   backend = key_backend(module_path, choice="auto")   # one per (kind, module) per process
#   key = backend.load_private_key("pkcs11:token=...;object=...;type=private")
#   key.address      # the EVP_PKEY* as an int, for SSL_CTX_use_PrivateKey & co.
#   key.free()       # drop our reference (a context that took the key holds its own)
#
# The caller logs in through its SessionPool first: PKCS#11 login is per
# application, so the engine's and provider's sessions on the same module
# instance are already logged in and never need the PIN. A module that makes a
# new instance per C_GetFunctionList (p11-kit's client: ``Module.instance_per_call``)
# gives them one of their own, not logged in: they are then given the pool's PIN
# source and log in themselves.

BACKEND_CHOICES = ("auto", "engine", "provider")


class OpenSSLKeyError(Pkcs11Error):
    hint = "check that the key exists (`tpp-agent keys list`) and that the agent is logged in to the token"


class OpenSSLBackendError(Pkcs11Error):
    hint = ("install libp11's engine (Debian: libengine-pkcs11-openssl) or pkcs11-provider (Debian 13), "
            "or set [pkcs11] openssl_backend to one that is installed")


def _openssl_errors(lib: ctypes.CDLL) -> str:
    """Drain OpenSSL's error queue of this thread into one line."""
    messages: list[str] = []
    buffer = ctypes.create_string_buffer(256)
    while code := lib.ERR_get_error():
        lib.ERR_error_string_n(code, buffer, len(buffer))
        messages.append(buffer.value.decode("ascii", "replace"))
    return "; ".join(messages) or "no detail from OpenSSL"


@functools.cache
def _crypto() -> ctypes.CDLL:
    lib = libcrypto()
    lib.ERR_get_error.restype = ctypes.c_ulong
    lib.ERR_get_error.argtypes = []
    lib.ERR_error_string_n.restype = None
    lib.ERR_error_string_n.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]
    lib.ERR_clear_error.restype = None
    lib.ERR_clear_error.argtypes = []
    lib.EVP_PKEY_free.restype = None
    lib.EVP_PKEY_free.argtypes = [ctypes.c_void_p]
    return lib


class TokenPrivateKey:
    """An ``EVP_PKEY*`` whose private half stays on the token; we own one reference.

    OpenSSL counts references: ``SSL_CTX_use_PrivateKey`` takes its own, so a
    context keeps the key alive until the context is freed, whatever we do here.
    """

    def __init__(self, address: int, uri: str, backend: str) -> None:
        self._address: int | None = address
        self.uri = uri
        self.backend = backend

    @property
    def address(self) -> int:
        if self._address is None:
            raise OpenSSLKeyError(f"key {self.uri} was already freed")
        return self._address

    def free(self) -> None:
        address, self._address = self._address, None
        if address is not None:
            _crypto().EVP_PKEY_free(address)

    def __enter__(self) -> TokenPrivateKey:
        return self

    def __exit__(self, *_: object) -> None:
        self.free()

    def __repr__(self) -> str:
        return f"TokenPrivateKey({self.uri!r}, backend={self.backend!r})"


class KeyBackend(Protocol):
    name: str

    def load_private_key(self, uri: str, module_generation: int = 0) -> TokenPrivateKey: ...


class EngineBackend:
    """libp11's ``pkcs11`` engine on one PKCS#11 module, one per process.

    Loaded by path through OpenSSL's ``dynamic`` engine (a second load of the
    same engine fails in libp11 0.4.12). Never finished or freed: libp11 would
    ``C_Finalize`` the module that python-pkcs11 shares with it.

    libp11 0.4.12 lists the module's slots once per context, when it loads its
    first key, so a token initialised later is not visible to that context; its
    ``RE_ENUMERATE`` control frees slot objects that live keys still point to (it
    crashed here), so it is not used. Instead, when a key is not found and the
    module now lists other tokens than when the context was made, the context is
    renewed (as below) and the key looked up once more. Keys added later to a
    listed token are found without that.

    After the module was finalized and initialised again (``Module.generation``
    changed), every session and object handle libp11 holds is stale, and libp11
    0.4.12 renews them only after a fork. So the engine's per-engine state (its
    ``ENGINE_CTX``, kept in the engine's ex_data) is swapped for a fresh one: the
    next key load makes a new libp11 context that lists the slots and opens
    sessions again. The old context is left alone (keys of live TLS contexts still
    point into it); a second engine instance is no way out, as OpenSSL refuses to
    bind the same engine library twice.
    """

    name = "engine"

    def __init__(self, module_path: str, engine_path: Path) -> None:
        self.module_path = module_path
        self.engine_path = engine_path
        self._lock = threading.Lock()
        self._engine: int | None = None
        self._ctx_index: int | None = None  # libp11's ex_data slot on the engine
        self._generation = 0  # the module generation the engine's libp11 context was made in
        self._tokens: frozenset[tuple[str, str]] | None = None  # the tokens present when it was made
        lib = _crypto()
        lib.ENGINE_by_id.restype = ctypes.c_void_p
        lib.ENGINE_by_id.argtypes = [ctypes.c_char_p]
        lib.ENGINE_ctrl_cmd_string.restype = ctypes.c_int
        lib.ENGINE_ctrl_cmd_string.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        lib.ENGINE_init.restype = ctypes.c_int
        lib.ENGINE_init.argtypes = [ctypes.c_void_p]
        lib.ENGINE_load_private_key.restype = ctypes.c_void_p
        lib.ENGINE_load_private_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.ENGINE_get_ex_data.restype = ctypes.c_void_p
        lib.ENGINE_get_ex_data.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.ENGINE_set_ex_data.restype = ctypes.c_int
        lib.ENGINE_set_ex_data.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        self._lib = lib


    def _start(self) -> int:
        lib = self._lib
        lib.ERR_clear_error()
        engine = lib.ENGINE_by_id(b"dynamic")
        if not engine:
            raise OpenSSLBackendError(f"OpenSSL has no dynamic engine loader: {_openssl_errors(lib)}")
        commands = ((b"SO_PATH", str(self.engine_path).encode()), (b"ID", b"pkcs11"), (b"LIST_ADD", b"0"),
                    (b"LOAD", None))
        for command, argument in commands:
            self._ctrl(engine, command, argument)
        # libp11 makes its ENGINE_CTX on the first control command: the ex_data slot
        # that appears now is libp11's (the one already there is the dynamic loader's).
        before = self._ex_data_slots(engine)
        self._ctrl(engine, b"MODULE_PATH", self.module_path.encode())
        added = self._ex_data_slots(engine) - before
        self._ctx_index = added.pop() if len(added) == 1 else None
        self._give_pin(engine)
        # The module is usually initialised already (python-pkcs11 with locking):
        # libp11 gets CKR_CRYPTOKI_ALREADY_INITIALIZED and carries on.
        if not lib.ENGINE_init(engine):
            raise OpenSSLBackendError(f"libp11's engine failed to start on {self.module_path}: {_openssl_errors(lib)}")
        return int(engine)

    def _ctrl(self, engine: int, command: bytes, argument: bytes | None) -> None:
        if not self._lib.ENGINE_ctrl_cmd_string(engine, command, argument, 0):
            raise OpenSSLBackendError(
                f"cannot load libp11's engine {self.engine_path} ({command.decode()}): {_openssl_errors(self._lib)}")

    def _ex_data_slots(self, engine: int) -> set[int]:
        return {i for i in range(64) if self._lib.ENGINE_get_ex_data(engine, i)}

    def _renew(self, engine: int) -> None:
        """A fresh libp11 context for keys loaded from now on (see the class docstring)."""
        if self._ctx_index is None:
            raise OpenSSLBackendError(
                "the PKCS#11 module was re-initialised and libp11's engine cannot be renewed in place",
                hint="restart the agent to give TLS a working token key again")
        self._lib.ENGINE_set_ex_data(engine, self._ctx_index, None)
        self._ctrl(engine, b"MODULE_PATH", self.module_path.encode())
        self._give_pin(engine)  # the new context has its own instance of such a module, not logged in

    def _give_pin(self, engine: int) -> None:
        pin = _own_instance_pin(self.module_path)
        if pin is not None:
            self._ctrl(engine, b"PIN", pin)

    def load_private_key(self, uri: str, module_generation: int = 0) -> TokenPrivateKey:
        with self._lock:
            if self._engine is None:
                self._engine = self._start()
                self._generation = module_generation
                self._tokens = present_tokens(self.module_path)
            engine = self._engine
            if module_generation != self._generation:
                self._renew(engine)
                self._generation = module_generation
                self._tokens = present_tokens(self.module_path)
            pkey = self._load(engine, uri)
            if not pkey:
                tokens = present_tokens(self.module_path)
                if tokens is not None and tokens != self._tokens and self._ctx_index is not None:
                    self._renew(engine)  # a token appeared (or went) since the context listed the slots
                    self._tokens = tokens
                    pkey = self._load(engine, uri)
            if not pkey:
                raise OpenSSLKeyError(f"libp11's engine cannot load {uri}: {_openssl_errors(self._lib)}")
        return TokenPrivateKey(int(pkey), uri, self.name)

    def _load(self, engine: int, uri: str) -> int | None:
        self._lib.ERR_clear_error()
        pkey: int | None = self._lib.ENGINE_load_private_key(engine, uri.encode("utf-8"), None, None)
        return pkey


class _OsslParam(ctypes.Structure):
    _fields_ = [("key", ctypes.c_char_p), ("data_type", ctypes.c_uint), ("data", ctypes.c_void_p),
                ("data_size", ctypes.c_size_t), ("return_size", ctypes.c_size_t)]


_OSSL_PARAM_UTF8_STRING = 4
_OSSL_STORE_INFO_PKEY = 4


class ProviderBackend:
    """pkcs11-provider in a library context of its own.

    The provider is never loaded into OpenSSL's default context, so no fetch
    made for TLS (server chain verification, digests, key exchange) can land on
    the token; only keys loaded here live there. OpenSSL runs an operation on a
    provider key with that key's own provider, whatever context the TLS
    connection uses.

    Settings (pkcs11-provider 1.0, Debian 13): ``no-deinit``, because the module
    is shared with python-pkcs11 and must not be finalised under it when OpenSSL
    winds the provider down; ``cache-keys = false``, because the cache is a
    session copy of the private key (same label and id) that our own lookups on
    the same module would then find twice. The store is opened with OpenSSL's
    null UI: the agent logs in through its pool, and the provider must never
    prompt for a PIN on a terminal.
    """

    name = "provider"

    def __init__(self, module_path: str, provider_path: Path) -> None:
        self.module_path = module_path
        self.provider_path = provider_path
        self._lock = threading.Lock()
        lib = _crypto()
        for name in ("OSSL_PROVIDER_load_ex", "OSSL_STORE_open_ex"):
            if not hasattr(lib, name):
                raise OpenSSLBackendError(f"the system OpenSSL lacks {name} (pkcs11-provider needs OpenSSL >= 3.2)")
        lib.OSSL_LIB_CTX_new.restype = ctypes.c_void_p
        lib.OSSL_LIB_CTX_new.argtypes = []
        lib.OSSL_PROVIDER_load.restype = ctypes.c_void_p
        lib.OSSL_PROVIDER_load.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.OSSL_PROVIDER_load_ex.restype = ctypes.c_void_p
        lib.OSSL_PROVIDER_load_ex.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(_OsslParam)]
        lib.OSSL_STORE_open_ex.restype = ctypes.c_void_p
        lib.OSSL_STORE_open_ex.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p,
                                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.OSSL_STORE_expect.restype = ctypes.c_int
        lib.OSSL_STORE_expect.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.OSSL_STORE_load.restype = ctypes.c_void_p
        lib.OSSL_STORE_load.argtypes = [ctypes.c_void_p]
        lib.OSSL_STORE_eof.restype = ctypes.c_int
        lib.OSSL_STORE_eof.argtypes = [ctypes.c_void_p]
        lib.OSSL_STORE_close.restype = ctypes.c_int
        lib.OSSL_STORE_close.argtypes = [ctypes.c_void_p]
        lib.OSSL_STORE_INFO_get_type.restype = ctypes.c_int
        lib.OSSL_STORE_INFO_get_type.argtypes = [ctypes.c_void_p]
        lib.OSSL_STORE_INFO_get1_PKEY.restype = ctypes.c_void_p
        lib.OSSL_STORE_INFO_get1_PKEY.argtypes = [ctypes.c_void_p]
        lib.OSSL_STORE_INFO_free.restype = None
        lib.OSSL_STORE_INFO_free.argtypes = [ctypes.c_void_p]
        lib.UI_null.restype = ctypes.c_void_p
        lib.UI_null.argtypes = []
        self._lib = lib
        self._libctx = self._start()
        self._generation = 0  # the module generation the context was made in
        self._tokens = present_tokens(module_path)  # what the provider listed

    def _start(self) -> int:
        lib = self._lib
        lib.ERR_clear_error()
        libctx = lib.OSSL_LIB_CTX_new()
        if not libctx:
            raise OpenSSLBackendError(f"cannot create an OpenSSL library context: {_openssl_errors(lib)}")
        # The provider's own digests and public-key operations need the default provider beside it.
        if not lib.OSSL_PROVIDER_load(libctx, b"default"):
            raise OpenSSLBackendError(f"cannot load OpenSSL's default provider: {_openssl_errors(lib)}")
        settings: tuple[tuple[bytes, bytes], ...] = (
            (b"pkcs11-module-path", self.module_path.encode()), (b"pkcs11-module-quirks", b"no-deinit"),
            (b"pkcs11-module-cache-keys", b"false"))
        pin = _own_instance_pin(self.module_path)
        if pin is not None:
            settings += ((b"pkcs11-module-token-pin", pin),)
        params = (_OsslParam * (len(settings) + 1))()  # the last one stays zeroed: the end marker
        for i, (key, value) in enumerate(settings):
            params[i] = _OsslParam(key, _OSSL_PARAM_UTF8_STRING, ctypes.cast(ctypes.c_char_p(value), ctypes.c_void_p),
                                   len(value), 0)
        # Loaded by name from OpenSSL's module directory: the name is what "provider=pkcs11" matches.
        if not lib.OSSL_PROVIDER_load_ex(libctx, b"pkcs11", params):
            raise OpenSSLBackendError(
                f"cannot load pkcs11-provider {self.provider_path} for {self.module_path}: {_openssl_errors(lib)}")
        return int(libctx)

    def load_private_key(self, uri: str, module_generation: int = 0) -> TokenPrivateKey:
        with self._lock:
            if module_generation != self._generation:
                # The pool re-initialised the module (the far end restarted): the provider's sessions and slots
                # are gone with it (every key "not found" until a restart, found on Debian 13 with p11-kit's
                # module), so a new context, as the engine renews its own.
                self._libctx = self._start()
                self._generation = module_generation
                self._tokens = present_tokens(self.module_path)
            pkey = self._load(uri)
            if pkey is None:
                tokens = present_tokens(self.module_path)
                if tokens is not None and tokens != self._tokens:
                    # A token appeared (or went) since the provider listed the slots: a new context lists them
                    # again. The old one stays: keys loaded from it run their operations there.
                    self._libctx = self._start()
                    self._tokens = tokens
                    pkey = self._load(uri)
            if pkey is None:
                raise OpenSSLKeyError(f"pkcs11-provider found no private key at {uri}: {_openssl_errors(self._lib)}")
            return TokenPrivateKey(pkey, uri, self.name)

    def _load(self, uri: str) -> int | None:
        lib = self._lib
        lib.ERR_clear_error()
        store = lib.OSSL_STORE_open_ex(uri.encode("utf-8"), self._libctx, b"provider=pkcs11",
                                       lib.UI_null(), None, None, None, None)
        if not store:
            raise OpenSSLKeyError(f"pkcs11-provider cannot open {uri}: {_openssl_errors(lib)}")
        try:
            lib.OSSL_STORE_expect(store, _OSSL_STORE_INFO_PKEY)
            while not lib.OSSL_STORE_eof(store):
                info = lib.OSSL_STORE_load(store)
                if not info:
                    continue
                try:
                    if lib.OSSL_STORE_INFO_get_type(info) == _OSSL_STORE_INFO_PKEY:
                        pkey = lib.OSSL_STORE_INFO_get1_PKEY(info)
                        if pkey:
                            return int(pkey)
                finally:
                    lib.OSSL_STORE_INFO_free(info)
        finally:
            lib.OSSL_STORE_close(store)
        return None


def present_tokens(module_path: str) -> frozenset[tuple[str, str]] | None:
    """(label, serial) of the tokens the module lists now; None when python-pkcs11 has not loaded it. Both backends
    list the module's slots once, when their context is made: a token that appears later (initialised, attached,
    a new HSM partition) is found only by a new one."""
    module = Module.loaded(module_path)
    if module is None:
        return None
    try:
        return frozenset((token.label, repr(token.serial)) for token in module.tokens())
    except Pkcs11Error:
        return None


def _own_instance_pin(module_path: str) -> bytes | None:
    """The PIN, when this backend's instance of the module is not the session pool's (see above)."""
    module = Module.loaded(module_path)
    if module is None or not module.instance_per_call or module.login_pin is None:
        return None
    return module.login_pin()


_backends: dict[tuple[str, str], KeyBackend] = {}
_backends_lock = threading.Lock()


def installed_backends() -> list[str]:
    """The OpenSSL routes to the token this machine has: ``engine`` (Debian 12 and 13), ``provider`` (Debian 13)."""
    return [name for name, found in (("engine", find_engine()), ("provider", find_provider())) if found is not None]


def choose_backend(choice: str = "auto") -> str:
    """``provider`` where pkcs11-provider is installed, else ``engine``; or what the config says."""
    if choice not in BACKEND_CHOICES:
        raise OpenSSLBackendError(f"unknown OpenSSL backend {choice!r}: use one of {', '.join(BACKEND_CHOICES)}")
    if choice == "auto":
        return "provider" if find_provider() is not None else "engine"
    return choice


def key_backend(module_path: str, choice: str = "auto") -> KeyBackend:
    """The process's one engine or provider instance for a PKCS#11 module."""
    kind = choose_backend(choice)
    real = os.path.realpath(module_path)
    with _backends_lock:
        backend = _backends.get((kind, real))
        if backend is None:
            check_linkage()
            if kind == "provider":
                provider = find_provider()
                if provider is None:
                    raise OpenSSLBackendError("pkcs11-provider is not installed",
                                              hint="Debian 13: apt install pkcs11-provider; Debian 12 has only the "
                                                   "engine: set [pkcs11] openssl_backend = engine or auto")
                backend = ProviderBackend(real, provider)
            else:
                engine = find_engine()
                if engine is None:
                    raise OpenSSLBackendError("libp11's engine is not installed (apt install libengine-pkcs11-openssl)")
                backend = EngineBackend(real, engine)
            _backends[(kind, real)] = backend
        return backend
