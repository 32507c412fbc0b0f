"""TLS contexts for talking to one bank, with the client key on the token.

    settings = TlsSettings.from_table("bank1", config.section("banks")["bank1"], base_dir)
    tls = build_context(runtime, settings)     # -> TlsContext
    tls.context                                 # a pyOpenSSL SSL.Context, ready for connections
    tls.certificate                             # our client certificate (cryptography x509.Certificate)

Policy (FAPI 2.0 Security Profile 5.2): TLS 1.2 minimum, 1.3 allowed; with TLS 1.2
only the FAPI suites (configurable per bank, since they are all RSA suites and a
bank with an EC server certificate needs ECDHE-ECDSA ones); the server's chain is
verified against the bank's CA bundle only (the ecosystem's roots are private;
the system store is loaded only when ``system_ca = true``); the host name is
checked by OpenSSL during the handshake (see ``pool.py``).

The private key is an ``EVP_PKEY`` loaded from the token by its ``pkcs11:`` URI
through libp11's engine or pkcs11-provider (``pkcs11_backends.openssl``), and the
context is checked to hold a certificate matching it before any connection.

``[banks.NAME]`` settings read here (other layers add theirs to the same table):
``ca_bundle`` (PEM path), ``system_ca`` (bool), ``client_key`` (alias or URI,
default ``transport``), ``client_certificate`` (PEM path; default: the token's
certificate with the key's CKA_ID), ``tls12_ciphers`` (list of OpenSSL suite
names), ``tls13`` (bool, default true), ``connect_timeout``/``read_timeout``
(seconds), ``max_connections``, and for ``client.py``: ``request_timeout`` (seconds for a
whole request: connect, send, the whole answer; default 30), ``max_in_flight`` (requests
under way at once at this bank, in all serving processes, default 4: the rest are refused
within half a second, so one slow bank cannot take every bank worker), ``max_response_bytes`` (default 4 MiB) and
``max_discovery_bytes`` (default 256 KiB) for the answers, ``idle_timeout`` (seconds a
pooled connection may sit unused and still be reused, default 30; less if the bank's
``Keep-Alive`` header says so).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi

from agent import log
from agent.compat import not_valid_after, pyopenssl_certificate
from agent.errors import ConfigError
from agent.lifecycle.validity import expiry_warning_days, renewal_due, validity_problem
from agent.transport.errors import (
    CaBundleError,
    ClientCertificateMissingError,
    ClientCertificateValidityError,
    KeyCertificateMismatchError,
)
from pkcs11_backends.openssl import check_linkage, key_backend, libssl

if TYPE_CHECKING:  # agent.runtime imports agent.transport.places
    from agent.runtime import Runtime

FAPI_TLS12_CIPHERS = (
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
)
DEFAULT_CLIENT_KEY = "transport"

_logger = log.get_logger("transport.tls")


@dataclasses.dataclass(frozen=True)
class TlsSettings:
    bank: str
    ca_bundle: Path | None
    client_key: str = DEFAULT_CLIENT_KEY
    client_certificate: Path | None = None
    tls12_ciphers: tuple[str, ...] = FAPI_TLS12_CIPHERS
    tls13: bool = True
    system_ca: bool = False
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_connections: int = 4
    request_timeout: float = 30.0
    max_in_flight: int = 4
    max_response_bytes: int = 4 << 20
    max_discovery_bytes: int = 256 << 10
    idle_timeout: float = 30.0

    @classmethod
    def from_table(cls, bank: str, table: Mapping[str, Any], base: Path) -> TlsSettings:
        """Read the transport settings of ``[banks.NAME]``; unknown keys belong to other layers."""
        where = f"[banks.{bank}]"

        def path(key: str) -> Path | None:
            value = table.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where} {key} must be a file path")
            p = Path(value).expanduser()
            return p if p.is_absolute() else base / p

        def number(key: str, default: float) -> float:
            value = table.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600 \
                    or not math.isfinite(value):
                raise ConfigError(f"{where} {key} must be a number of seconds above 0, at most 3600")
            return float(value)

        def integer(key: str, default: int, low: int, high: int, unit: str = "") -> int:
            value = table.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{where} {key} must be an integer{unit} from {low} to {high}")
            return value

        def flag(key: str, default: bool) -> bool:
            value = table.get(key, default)
            if not isinstance(value, bool):
                raise ConfigError(f"{where} {key} must be true or false")
            return value

        ciphers = table.get("tls12_ciphers", list(FAPI_TLS12_CIPHERS))
        if not isinstance(ciphers, list) or not ciphers or not all(isinstance(c, str) and c for c in ciphers):
            raise ConfigError(f"{where} tls12_ciphers must be a non-empty list of OpenSSL cipher suite names")
        client_key = table.get("client_key", DEFAULT_CLIENT_KEY)
        if not isinstance(client_key, str) or not client_key:
            raise ConfigError(f"{where} client_key must be a key alias or a pkcs11: URI")
        settings = cls(
            bank=bank, ca_bundle=path("ca_bundle"), client_key=client_key,
            client_certificate=path("client_certificate"), tls12_ciphers=tuple(ciphers),
            tls13=flag("tls13", True), system_ca=flag("system_ca", False),
            connect_timeout=number("connect_timeout", 10.0), read_timeout=number("read_timeout", 30.0),
            max_connections=integer("max_connections", 4, 1, 64),
            request_timeout=number("request_timeout", 30.0), max_in_flight=integer("max_in_flight", 4, 1, 256),
            max_response_bytes=integer("max_response_bytes", 4 << 20, 1024, 1 << 30, " (bytes)"),
            max_discovery_bytes=integer("max_discovery_bytes", 256 << 10, 1024, 16 << 20, " (bytes)"),
            idle_timeout=number("idle_timeout", 30.0),
        )
        if settings.ca_bundle is None and not settings.system_ca:
            raise ConfigError(f"{where} needs ca_bundle (the ecosystem's CAs are private)",
                              hint="set ca_bundle to a PEM file with the bank's root CA, or system_ca = true")
        return settings


@dataclasses.dataclass(frozen=True)
class TlsContext:
    """A ready context for one bank and the identity it presents."""

    bank: str
    context: SSL.Context
    certificate: x509.Certificate
    key_uri: str
    backend: str
    module_generation: int = 0  # the PKCS#11 module's generation its key was loaded in

    @property
    def certificate_sha256(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex()


@functools.cache
def _libssl() -> ctypes.CDLL:
    lib = libssl()
    lib.SSL_CTX_use_PrivateKey.restype = ctypes.c_int
    lib.SSL_CTX_use_PrivateKey.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return lib


def pointer(cdata: Any) -> int:
    """The address behind a pyOpenSSL cffi pointer (``Context._context``, ``Connection._ssl``)."""
    return int(_ffi.cast("uintptr_t", cdata))


def build_context(runtime: Runtime, settings: TlsSettings, openssl_backend: str | None = None) -> TlsContext:
    """A pyOpenSSL context for ``settings.bank`` with the client key on the token.

    ``openssl_backend`` (``auto``/``engine``/``provider``) overrides ``[pkcs11] openssl_backend``.
    """
    check_linkage()  # a PyPI OpenSSL copy cannot take a token key: refuse with the fix
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION if settings.tls13 else SSL.TLS1_2_VERSION)
    try:
        context.set_cipher_list(":".join(settings.tls12_ciphers).encode("ascii"))
    except SSL.Error as exc:
        raise ConfigError(f"[banks.{settings.bank}] tls12_ciphers: OpenSSL knows none of {settings.tls12_ciphers}",
                          hint="use OpenSSL cipher suite names such as ECDHE-RSA-AES128-GCM-SHA256") from exc
    context.set_options(SSL.OP_NO_COMPRESSION)
    context.set_verify(SSL.VERIFY_PEER)
    _load_trust(context, settings)
    chain = client_chain(runtime, settings)
    problem = validity_problem(chain[0])
    if problem is not None:
        raise ClientCertificateValidityError(
            f"bank {settings.bank!r}: the client certificate {chain[0].subject.rfc4514_string()} is {problem}; "
            "it is never presented")
    context.use_certificate(pyopenssl_certificate(chain[0]))
    for extra in chain[1:]:
        context.add_extra_chain_cert(pyopenssl_certificate(extra))

    uri = str(runtime.keys.info(settings.client_key).uri)
    backend = key_backend(runtime.config.pkcs11.module, openssl_backend or runtime.config.pkcs11.openssl_backend)
    generation = runtime.module.generation
    with backend.load_private_key(uri, generation) as key:
        # The context takes its own reference: the key lives exactly as long as the context.
        if _libssl().SSL_CTX_use_PrivateKey(pointer(context._context), key.address) != 1:
            raise KeyCertificateMismatchError(
                f"the token key {uri} does not fit the client certificate {chain[0].subject.rfc4514_string()}")
    try:
        context.check_privatekey()
    except SSL.Error as exc:
        raise KeyCertificateMismatchError(
            f"the client certificate {chain[0].subject.rfc4514_string()} does not belong to the token key {uri}",
        ) from exc
    _warn_if_expiring(settings.bank, chain[0], expiry_warning_days(runtime.config))
    return TlsContext(settings.bank, context, chain[0], uri, backend.name, generation)


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def load_pem_chain(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in order; ValueError if there is none."""
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise ValueError("no PEM certificate")
    return [x509.load_pem_x509_certificate(block) for block in blocks]


def _load_trust(context: SSL.Context, settings: TlsSettings) -> None:
    if settings.ca_bundle is not None:
        try:
            load_pem_chain(settings.ca_bundle.read_bytes())
        except OSError as exc:
            raise CaBundleError(f"cannot read ca_bundle {settings.ca_bundle} of bank {settings.bank!r}: "
                                f"{exc.strerror}") from exc
        except ValueError as exc:
            raise CaBundleError(f"ca_bundle {settings.ca_bundle} of bank {settings.bank!r} holds no PEM "
                                "certificate") from exc
        context.load_verify_locations(str(settings.ca_bundle).encode())
    if settings.system_ca:
        context.set_default_verify_paths()


def client_chain(runtime: Runtime, settings: TlsSettings) -> list[x509.Certificate]:
    """Our certificate first, then any intermediates (from the PEM file)."""
    if settings.client_certificate is not None:
        try:
            chain = load_pem_chain(settings.client_certificate.read_bytes())
        except OSError as exc:
            raise ClientCertificateMissingError(
                f"cannot read client_certificate {settings.client_certificate}: {exc.strerror}") from exc
        except ValueError as exc:
            raise ClientCertificateMissingError(
                f"client_certificate {settings.client_certificate} holds no PEM certificate") from exc
        return list(chain)
    info = runtime.keys.info(settings.client_key)
    if info.certificate is None:
        raise ClientCertificateMissingError(
            f"no certificate on the token for key {info.uri} (bank {settings.bank!r})")
    return [x509.load_der_x509_certificate(info.certificate.der)]


def _warn_if_expiring(bank: str, cert: x509.Certificate, days: int) -> None:
    not_after = not_valid_after(cert)
    if renewal_due(not_after, days):
        _logger.warning("tls.client_certificate_expiring", bank=bank, not_after=not_after.isoformat(),
                        subject=cert.subject.rfc4514_string(), expiry_warning_days=days)
