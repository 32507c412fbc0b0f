"""A model of the trust framework's directory (Raidiam Connect) on 127.0.0.1, for the tests: not product.

What it speaks, as the directory's published API names it:

* ``POST /token``: ``grant_type=client_credentials``, ``client_id``, ``scope=directory:software``; client
  authentication ``tls_client_auth`` (RFC 8705): the TLS client certificate must chain to the directory's CA and
  its subject CN must be the ``client_id``. The access token is bound to that certificate (``cnf.x5t#S256``):
  every API call must come with the same certificate.
* ``GET  /organisations/{OrgId}/softwarestatements/{SSId}/certificates``: the software statement's
  certificates (``CertificateOrKey`` objects).
* ``POST /organisations/{OrgId}/softwarestatements/{SSId}/certificates/{type}``: a CSR (PEM body,
  ``Content-Type: application/x-pem-file``) becomes a certificate of that type — ``rtstransport`` (the
  transport certificate), ``rtssigning`` (the signing certificate) or ``enckey`` (the encryption certificate);
  ``sigkey`` is a JWK upload, not a CSR, and is refused here. A body that is not ``application/x-pem-file`` is 415.
  Answer 201 with the ``CertificateOrKey``, whose ``SignedCertPath`` is the PEM.
* ``GET  /organisations/{OrgId}/softwarestatements/{SSId}/certificates/{type}/{CertificateOrKeyId}``: one.
* ``PUT  …/certificates/{type}/{CertificateOrKeyId}`` with ``{"RevokeReason": "superseded"}``: revoked (the
  reasons are the directory's: unspecified, keycompromise, superseded, cessationofoperation, privilegewithdrawn).
* ``GET  /keystore/{OrgId}/{SSId}/{CertificateOrKeyId}.pem``: the issued certificate, as the directory's
  keystore serves it.
* ``GET  /participants``: the participants list (whatever the test set in ``participants``).

The modelled field names follow the directory's ``CertificateOrKey`` schema (``CertificateOrKeyId``,
``CertificateOrKeyType``, ``Status``, ``ValidFromDateTime``, ``ExpiryDateTime``, ``SignedCertPath``,
``x5t#S256``, ``SerialNumber``, ``RevokeReason``); a real directory returns more, which a client ignores.

Faults for the tests: ``fail_next(status)`` answers the next API call (token included) with that status, or
the next whose path contains ``where``; ``stall_next(seconds, where)`` answers the next such call that much later,
its work done first (a client that times out does not know the outcome); ``issue_for_other_key = True`` makes the
next certificate for a key that is not the CSR's.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import hashlib
import json
import re
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from modelbank.ca import CsrError, TestCA

SCOPE = "directory:software"
CSR_TYPES = ("rtstransport", "rtssigning", "enckey")
REVOKE_REASONS = ("unspecified", "keycompromise", "superseded", "cessationofoperation", "privilegewithdrawn")
TOKEN_LIFETIME = 300
_CERTS = re.compile(r"^/organisations/([^/]+)/softwarestatements/([^/]+)/certificates(?:/([^/]+)(?:/([^/]+))?)?$")
_KEYSTORE = re.compile(r"^/keystore/([^/]+)/([^/]+)/([^/]+)\.pem$")
Answer = tuple[int, dict[str, Any] | list[Any] | bytes | None]
_Fault = TypeVar("_Fault", int, float)


@dataclasses.dataclass
class IssuedCertificate:
    id: str
    type: str
    pem: bytes
    status: str = "Active"
    revoke_reason: str | None = None

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.pem)


class ModelDirectory:
    """``with ModelDirectory(state_dir, ca, org, ss, client_id) as directory:`` serves until the block ends.

    ``ca`` issues the certificates (pass the model bank's: the bank then trusts what the directory issues).
    """

    def __init__(self, state_dir: Path, ca: TestCA, *, organisation_id: str, software_statement_id: str,
                 client_id: str, host: str = "127.0.0.1") -> None:
        self.ca = ca
        self.organisation_id, self.software_statement_id, self.client_id = (organisation_id, software_statement_id,
                                                                            client_id)
        self.host = host
        self.participants: list[Any] = []
        self.certificates: dict[str, IssuedCertificate] = {}
        self.requests: list[tuple[str, str]] = []
        self.presented: list[str | None] = []  # per request: the SHA-256 (hex) of the client certificate, if any
        self.issue_for_other_key = False
        self._failures: list[tuple[int, str]] = []  # (status, where): in the order given
        self._stalls: list[tuple[float, str]] = []  # (seconds, where)
        self._tokens: dict[str, tuple[str, float]] = {}  # access token -> (x5t#S256, expiry)
        self._lock = threading.Lock()
        credentials = ca.server_credentials(state_dir / "directory-server")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(credentials.cert_file, credentials.key_file)
        self.context.verify_mode = ssl.CERT_OPTIONAL  # /participants is public; the API checks for itself
        self.context.load_verify_locations(cafile=str(ca.cert_file))
        self._server = _Server((host, 0), _Handler, self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self._server.server_address[1]}"

    @property
    def token_endpoint(self) -> str:
        return self.url + "/token"

    @property
    def participants_url(self) -> str:
        return self.url + "/participants"

    def fail_next(self, status: int, times: int = 1, where: str = "") -> None:
        with self._lock:
            self._failures.extend([(status, where)] * times)

    def stall_next(self, seconds: float, where: str = "") -> None:
        with self._lock:
            self._stalls.append((seconds, where))

    def start(self) -> ModelDirectory:
        self._thread = threading.Thread(target=self._server.serve_forever, name="modeldirectory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> ModelDirectory:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the handler asks -------------------------------------------------------------------------
    def _injected_failure(self, path: str) -> int | None:
        with self._lock:
            return _pop_first(self._failures, path)

    def _injected_stall(self, path: str) -> float:
        with self._lock:
            return _pop_first(self._stalls, path) or 0.0

    def issue_token(self, form: dict[str, str], cert_der: bytes | None) -> Answer:
        if form.get("grant_type") != "client_credentials":
            return _oauth(400, "unsupported_grant_type", "only client_credentials")
        if cert_der is None:
            return _oauth(401, "invalid_client", "tls_client_auth: no client certificate presented")
        names = x509.load_der_x509_certificate(cert_der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if form.get("client_id") != self.client_id or not names or names[0].value != self.client_id:
            return _oauth(401, "invalid_client", "tls_client_auth: the certificate is not this client's")
        if SCOPE not in form.get("scope", "").split():
            return _oauth(400, "invalid_scope", f"scope must include {SCOPE}")
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = (_thumbprint(cert_der), time.time() + TOKEN_LIFETIME)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME, "scope": SCOPE}

    def authorised(self, authorization: str, cert_der: bytes | None) -> bool:
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            bound = self._tokens.get(token) if scheme.lower() == "bearer" else None
        return bound is not None and bound[1] > time.time() and cert_der is not None and \
            bound[0] == _thumbprint(cert_der)

    def create(self, kind: str, body: bytes) -> Answer:
        if kind not in CSR_TYPES:
            return _error(400, "InvalidCertificateType", f"a CSR makes one of {', '.join(CSR_TYPES)}, not {kind!r}")
        try:
            csr = x509.load_pem_x509_csr(body)
        except ValueError:
            return _error(400, "InvalidCSR", "the body is not a PEM certificate signing request")
        if self.issue_for_other_key:
            self.issue_for_other_key = False
            other = ec.generate_private_key(ec.SECP256R1())
            csr = x509.CertificateSigningRequestBuilder().subject_name(csr.subject).sign(other, hashes.SHA256())
        try:
            pem = self.ca.issue_from_csr(csr.public_bytes(serialization.Encoding.PEM))
        except CsrError as exc:
            return _error(400, "InvalidCSR", str(exc))
        issued = IssuedCertificate(str(uuid.uuid4()), kind, pem)
        with self._lock:
            self.certificates[issued.id] = issued
        return 201, self.describe(issued)

    def revoke(self, issued: IssuedCertificate, body: bytes) -> Answer:
        try:
            reason = json.loads(body).get("RevokeReason")
        except (ValueError, AttributeError):
            reason = None
        if reason not in REVOKE_REASONS:
            return _error(400, "InvalidRevokeReason", f"RevokeReason must be one of {', '.join(REVOKE_REASONS)}")
        if issued.status == "Revoked":
            return _error(409, "AlreadyRevoked", f"certificate {issued.id} is already revoked")
        issued.status, issued.revoke_reason = "Revoked", reason
        return 204, None

    def describe(self, issued: IssuedCertificate) -> dict[str, Any]:
        cert = issued.certificate
        der = cert.public_bytes(serialization.Encoding.DER)
        return {"OrganisationId": self.organisation_id, "SoftwareStatementIds": [self.software_statement_id],
                "ClientName": "model TPP", "CertificateOrKeyId": issued.id, "CertificateOrKeyType": issued.type,
                "Status": issued.status, "RevokeReason": issued.revoke_reason,
                "ValidFromDateTime": _iso(cert, "not_valid_before"), "ExpiryDateTime": _iso(cert, "not_valid_after"),
                "SerialNumber": format(cert.serial_number, "x"), "x5t#S256": _thumbprint(der),
                "x5c": [base64.b64encode(der).decode("ascii")], "kid": _thumbprint(der),
                "SignedCertPath": f"{self.url}/keystore/{self.organisation_id}/{self.software_statement_id}/"
                                  f"{issued.id}.pem"}


def _pop_first(faults: list[tuple[_Fault, str]], path: str) -> _Fault | None:
    """The first fault whose ``where`` is in ``path``, taken off the list."""
    for index, (fault, where) in enumerate(faults):
        if where in path:
            del faults[index]
            return fault
    return None


def _iso(cert: x509.Certificate, field: str) -> str:
    # cryptography 42 deprecates the naive not_valid_*; Debian 12's 38 has only those.
    when = getattr(cert, f"{field}_utc", None) or getattr(cert, field).replace(tzinfo=datetime.UTC)
    return str(when.isoformat()).replace("+00:00", "Z")


def _thumbprint(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def _oauth(status: int, error: str, description: str) -> Answer:
    return status, {"error": error, "error_description": description}


def _error(status: int, code: str, message: str) -> Answer:
    return status, {"errorCode": code, "errorMessage": message}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 directory: ModelDirectory) -> None:
        self.directory = directory
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        sock: socket.socket = request
        sock.settimeout(30)
        try:
            tls = self.directory.context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, answer: Answer) -> None:
        status, body = answer
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/x-pem-file" if isinstance(body, bytes) else
                             "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self) -> Answer:
        directory = self.server.directory
        body = self._body()
        cert = self.connection.getpeercert(binary_form=True)
        with directory._lock:
            directory.requests.append((self.command, self.path))
            directory.presented.append(hashlib.sha256(cert).hexdigest() if cert else None)
        path = urllib.parse.urlsplit(self.path).path
        if self.command == "GET" and path == "/participants":
            return 200, directory.participants
        failure = directory._injected_failure(path)
        if failure is not None:
            return _error(failure, "Injected", f"model directory told to answer {failure}")
        if self.command == "POST" and path == "/token":
            form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
            return directory.issue_token(form, cert)
        if not directory.authorised(self.headers.get("Authorization", ""), cert):
            return _error(401, "Unauthorized", "a directory:software token bound to this client certificate "
                                               "is needed")
        keystore = _KEYSTORE.match(path)
        match = _CERTS.match(path)
        if keystore is not None and self.command == "GET":
            issued = directory.certificates.get(keystore.group(3))
            return (200, issued.pem) if issued else _error(404, "NotFound", "no such certificate")
        if match is None:
            return _error(404, "NotFound", f"no resource at {path}")
        org, ss, kind, cert_id = match.groups()
        if (org, ss) != (directory.organisation_id, directory.software_statement_id):
            return _error(403, "Forbidden", "this client may not act for that organisation or software statement")
        if kind is None and self.command == "GET":
            return 200, [directory.describe(c) for c in directory.certificates.values()]
        if kind is not None and cert_id is None and self.command == "POST":
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-pem-file":
                return _error(415, "UnsupportedMediaType", "a CSR is sent as application/x-pem-file")
            return directory.create(kind, body)
        issued = directory.certificates.get(cert_id or "")
        if issued is None or issued.type != kind:
            return _error(404, "NotFound", f"no {kind} certificate {cert_id}")
        if self.command == "GET":
            return 200, directory.describe(issued)
        if self.command == "PUT":
            return directory.revoke(issued, body)
        return _error(405, "MethodNotAllowed", f"{self.command} is not served here")

    def _serve(self) -> None:
        answer = self._answer()
        stall = self.server.directory._injected_stall(urllib.parse.urlsplit(self.path).path)
        if stall:
            time.sleep(stall)
        with contextlib.suppress(OSError):  # a stalled answer's client may have gone: that was the point
            self._send(answer)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()
