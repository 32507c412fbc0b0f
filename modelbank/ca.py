"""The model bank's test CA: it signs the bank's server certificate and, standing in for
the trust framework's directory, issues TPP certificates from their CSRs.

The CA's and the server's private keys are the model bank's own test data. They live
in the state directory the model bank is given (never under the repository, never in
the TPP's state directory); the TPP's keys stay on its token.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_SERVER_NAMES = ("localhost", "127.0.0.1")
_ONE_DAY = datetime.timedelta(days=1)


class CsrError(Exception):
    """The CSR handed to the CA is unreadable or its signature does not verify."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(general)


@dataclasses.dataclass(frozen=True)
class ServerCredentials:
    """A server certificate chain and key as files, for ``ssl.SSLContext.load_cert_chain``."""

    cert_file: Path
    key_file: Path


class TestCA:
    """A CA whose key and certificate live as files in ``directory`` (created on first use)."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "Model Bank Test CA") -> None:
        self.directory = directory
        self.name = name
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.cert_file = directory / "ca.pem"
        key_file = directory / "ca.key"
        if self.cert_file.exists() and key_file.exists():
            self.certificate = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self._key = key
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "AE"),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Model Bank (test only)"),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _ONE_DAY).not_valid_after(now + 3650 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        _write_private(key_file, self._key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        self.cert_file.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def _issue(self, subject: x509.Name, public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
               usage: x509.ObjectIdentifier, *, not_before: datetime.datetime, not_after: datetime.datetime,
               san: x509.SubjectAlternativeName | None = None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        return builder.sign(self._key, hashes.SHA256())

    def issue_from_csr(self, csr_pem: bytes, days: float = 395, not_before: datetime.datetime | None = None) -> bytes:
        """A TLS client certificate (PEM) for the CSR's key and subject, as the directory would issue it.

        ``days`` may be negative together with an earlier ``not_before`` to make an
        expired certificate for tests. The default of 395 days is the directory's 13 months.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            try:
                csr = x509.load_der_x509_csr(csr_pem)
            except ValueError as exc:
                raise CsrError(f"not a PEM or DER certificate signing request: {exc}") from None
        if not csr.is_signature_valid:
            raise CsrError("the CSR's signature does not verify against its own public key")
        public_key = csr.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise CsrError(f"unsupported public key type {type(public_key).__name__}")
        start = not_before or _now() - datetime.timedelta(minutes=5)
        cert = self._issue(csr.subject, public_key, ExtendedKeyUsageOID.CLIENT_AUTH, not_before=start,
                           not_after=start + datetime.timedelta(days=days))
        return cert.public_bytes(serialization.Encoding.PEM)

    def server_credentials(self, directory: Path, names: tuple[str, ...] = _SERVER_NAMES,
                           expired: bool = False) -> ServerCredentials:
        """A fresh server key and certificate for ``names``, written into ``directory``.

        RSA, so that TLS 1.2 clients limited to the FAPI suites (all ``ECDHE-RSA``/``DHE-RSA``) can connect.
        """
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = _now()
        not_before, not_after = (now - 30 * _ONE_DAY, now - _ONE_DAY) if expired else (now - _ONE_DAY,
                                                                                         now + 90 * _ONE_DAY)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        cert = self._issue(subject, key.public_key(), ExtendedKeyUsageOID.SERVER_AUTH, not_before=not_before,
                           not_after=not_after, san=_san(names))
        tag = "-".join(n.replace(".", "_") for n in names) + ("-expired" if expired else "")
        directory.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = directory / f"server-{tag}.pem", directory / f"server-{tag}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        return ServerCredentials(cert_file, key_file)
