"""Test PKI, token-held client identities and a Python ``ssl`` HTTPS server that requires client certificates.

The CA and server keys are test data in memory; every client key is generated on
the SoftHSM2 token and its certificate is built from the token's public key.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.runtime import Runtime
from agent.transport.tls import TlsSettings
from pkcs11_backends.certificates import store_certificate
from pkcs11_backends.keys import KeySpec
from tests.transport.hostile import HostileBank

NOW = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
DAY = datetime.timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class TestCa:
    __test__ = False

    """An in-memory CA (test data) that writes its certificate to ``dir/NAME-ca.pem``."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.cert = (x509.CertificateBuilder().subject_name(_name(f"{name} root")).issuer_name(_name(f"{name} root"))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem_path = directory / f"{name}-ca.pem"
        self.pem_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, public_key: Any, cn: str, *, server_names: tuple[str, ...] = (), days: int = 30,
              expired: bool = False) -> x509.Certificate:
        not_before, not_after = (NOW - 10 * DAY, NOW - DAY) if expired else (NOW - DAY, NOW + days * DAY)
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if server_names:
            alt: list[x509.GeneralName] = []
            for host in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    alt.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def server_identity(self, directory: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                        kind: str = "rsa") -> tuple[Path, Path]:
        """(cert chain PEM, key PEM) for a test server."""
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa"
            else ec.generate_private_key(ec.SECP256R1()))
        cert = self.issue(key.public_key(), hosts[0], server_names=hosts)
        cert_path, key_path = directory / f"{self.name}-{kind}-server.pem", directory / f"{self.name}-{kind}-server.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                              + self.cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki")


@pytest.fixture(scope="session")
def bank_ca(pki_dir: Path) -> TestCa:
    """Issues the banks' server certificates and (standing in for the directory) our client certificates."""
    return TestCa("ecosystem", pki_dir)


@pytest.fixture(scope="session")
def rogue_ca(pki_dir: Path) -> TestCa:
    """A CA nobody trusts."""
    return TestCa("rogue", pki_dir)


def client_identity(runtime: Runtime, ca: TestCa, spec: str = "rsa:2048", expired: bool = False) -> str:
    """Generate a key on the token, store a certificate (CN ``tpp LABEL``) issued by ``ca``; return its URI."""
    label = f"transport-{uuid.uuid4().hex[:12]}"
    info = runtime.keys.generate(label, KeySpec.parse(spec))
    public = serialization.load_der_public_key(runtime.keys.public_key_info(str(info.uri)).dump())
    cert = ca.issue(public, f"tpp {label}", expired=expired)
    with runtime.pool.session() as pooled:
        store_certificate(pooled.session, cert.public_bytes(serialization.Encoding.DER), label, info.id)
    return str(info.uri)


def settings_for(bank: str, ca: TestCa, key: str, **extra: Any) -> TlsSettings:
    return dataclasses.replace(TlsSettings(bank=bank, ca_bundle=ca.pem_path, client_key=key), **extra)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: TlsHttpServer

    def setup(self) -> None:
        super().setup()
        self.request.settimeout(10)
        self.request.do_handshake()
        self.server.record(self.request)

    def do_GET(self) -> None:
        if self.path == "/never":
            self.server.stopping.wait(30)
            return
        self._reply()

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        self._reply(self.rfile.read(length))

    def _reply(self, received: bytes = b"") -> None:
        peer = self.request.getpeercert()
        subject = dict(item[0] for item in peer["subject"]) if peer else {}
        body = json.dumps({
            "path": self.path,
            "interaction_id": self.headers.get("x-fapi-interaction-id"),
            "client_cn": subject.get("commonName"),
            "tls_version": self.request.version(),
            "cipher": self.request.cipher()[0],
            "received": received.decode("utf-8", "replace"),
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class TlsHttpServer(ThreadingHTTPServer):
    """HTTPS with ``ssl`` on 127.0.0.1 that requires a client certificate; counts handshakes."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.context = context
        self.full_handshakes = 0
        self.resumed_handshakes = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body are two writes
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def record(self, sock: ssl.SSLSocket) -> None:
        with self._lock:
            if sock.session_reused:
                self.resumed_handshakes += 1
            else:
                self.full_handshakes += 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # failed handshakes are what the negative tests provoke


def server_context(cert: Path, key: Path, client_ca: Path, max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
                   ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = max_version
    if ciphers:
        context.set_ciphers(ciphers)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(client_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve(ssl_context) -> TlsHttpServer`` running in a thread until the test ends."""
    servers: list[TlsHttpServer] = []

    def start(context: ssl.SSLContext) -> TlsHttpServer:
        server = TlsHttpServer(context)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stopping.set()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def hostile_identity(bank_ca: TestCa, pki_dir: Path) -> tuple[Path, Path]:
    return bank_ca.server_identity(pki_dir)


@pytest.fixture
def hostile(bank_ca: TestCa, hostile_identity: tuple[Path, Path]) -> Iterator[HostileBank]:
    """A :class:`HostileBank` with a certificate from ``bank_ca``, trusting client certificates from it."""
    bank = HostileBank(*hostile_identity, bank_ca.pem_path).start()
    yield bank
    bank.stop()
