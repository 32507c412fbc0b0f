"""A model bank (LFI) on 127.0.0.1: discovery document and ``/tpp-registration`` over mutual TLS.

Tests and the demo change what it does through :class:`Behaviour` (``bank.behaviour = ...``,
picked up by the next connection), the ``serve --fail MODE`` flag picks one at start.
Registration is also served under ``/mtls/`` so that a client's use of
``mtls_endpoint_aliases`` can be seen.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import json
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509

from modelbank.authorization import AUTHORIZATION_PATH, AuthorizationServer
from modelbank.ca import ServerCredentials, TestCA
from modelbank.events import EventSender
from modelbank.jose_bank import JWKS_PATH, BankJose
from modelbank.reply import Reply
from modelbank.signed_apis import SignedApis
from modelbank.token_endpoint import TokenEndpoint

REGISTRATION_PATH = "/tpp-registration"
MTLS_PREFIX = "/mtls"
DISCOVERY_PATH = "/.well-known/openid-configuration"


class ServerCert(enum.Enum):
    VALID = "valid"
    EXPIRED = "expired"
    UNKNOWN_CA = "unknown-ca"  # signed by a CA the client's bundle does not hold
    WRONG_HOST = "wrong-host"  # valid, but for bank.invalid only


@dataclasses.dataclass(frozen=True)
class Behaviour:
    registration_status: int = 204
    client_auth: bool = True  # False: no certificate request; registration then answers 401
    trust_client_ca: bool = True  # False: client certificates must chain to another CA
    hang: bool = False  # registration requests are read and never answered
    issuer: str | None = None  # the discovery document's issuer (default: the bank's own)
    server_cert: ServerCert = ServerCert.VALID
    keep_alive: bool = True  # False: every answer closes its connection (each request costs a handshake)
    # True: answers carry an x-fapi-interaction-id of the bank's own (kept in ModelBank.own_interaction_ids),
    # as a bank that does not echo the client's does.
    own_interaction_ids: bool = False

    @classmethod
    def failing(cls, mode: str) -> Behaviour:
        """A behaviour by name, for ``serve --fail``: see :data:`FAILURE_MODES`."""
        if mode.isdigit():
            return cls(registration_status=int(mode))
        special = {
            "no-client-auth": cls(client_auth=False),
            "untrusted-client": cls(trust_client_ca=False),
            "hang": cls(hang=True),
            "wrong-issuer": cls(issuer="https://impostor.invalid"),
            "expired-server-cert": cls(server_cert=ServerCert.EXPIRED),
            "unknown-ca": cls(server_cert=ServerCert.UNKNOWN_CA),
            "wrong-host": cls(server_cert=ServerCert.WRONG_HOST),
        }
        if mode not in special:
            raise ValueError(f"unknown failure mode {mode!r}; one of: {', '.join(FAILURE_MODES)}")
        return special[mode]


FAILURE_MODES = ("400", "401", "403", "500", "503", "no-client-auth", "untrusted-client", "hang", "wrong-issuer",
                 "expired-server-cert", "unknown-ca", "wrong-host")


@dataclasses.dataclass(frozen=True)
class Registration:
    subject: str
    sha256: str
    interaction_id: str
    path: str
    at: datetime.datetime


class ModelBank:
    """``with ModelBank(state_dir) as bank:`` serves on an ephemeral port until the block ends."""

    def __init__(self, state_dir: Path, host: str = "127.0.0.1", behaviour: Behaviour | None = None,
                 on_registration: Callable[[Registration], None] | None = None) -> None:
        self.state_dir = state_dir
        self.on_registration = on_registration
        self.host = host
        self.behaviour = behaviour or Behaviour()
        self.ca = TestCA(state_dir / "ca")
        self.registrations: list[Registration] = []
        # /token, /par and /accounts live in modelbank/token_endpoint.py.
        self.tokens = TokenEndpoint(lambda: self.issuer,
                                    lambda sha256: any(r.sha256 == sha256 for r in self.registrations))
        # The bank's keys and /jwks, /authorize and the code/refresh grants, signed APIs, the event sender.
        self.jose = BankJose()
        self.authorization = AuthorizationServer(self.tokens, self.jose, lambda: self.issuer)
        self.apis = SignedApis(self.tokens, self.authorization, self.jose, lambda: self.issuer)
        self.events = EventSender(self.jose, lambda: self.issuer, self.tokens.encryption_keys)
        self.routes = (self.tokens, self.jose, self.authorization, self.apis)
        self.requests: list[tuple[str, str, str]] = []  # (method, path, x-fapi-interaction-id)
        # x-fapi-interaction-id → SHA-256 (hex) of the client certificate that request came with: what a test
        # of a rotation checks the agent presented, seen from the server's side of the handshake.
        self.presented: dict[str, str | None] = {}
        self.own_interaction_ids: list[str] = []  # those it answered with (Behaviour.own_interaction_ids)
        self.handshakes = 0
        self.discovery_failures = 0  # answer 503 to this many discovery requests (a 5xx storm)
        self._contexts: dict[tuple[ServerCert, bool, bool], ssl.SSLContext] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._server = _Server((host, 0), _Handler, self)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def issuer(self) -> str:
        return self.url

    @property
    def discovery_url(self) -> str:
        return self.url + DISCOVERY_PATH

    @property
    def ca_bundle(self) -> Path:
        return self.ca.cert_file

    def discovery_document(self) -> dict[str, Any]:
        base, mtls = self.url, self.url + MTLS_PREFIX
        endpoints = {"token_endpoint": "/token", "pushed_authorization_request_endpoint": "/par",
                     "registration_endpoint": REGISTRATION_PATH}
        return {
            "issuer": self.behaviour.issuer or self.issuer,
            **{name: base + path for name, path in endpoints.items()},
            "authorization_endpoint": base + AUTHORIZATION_PATH,
            "jwks_uri": base + JWKS_PATH,
            "authorization_response_iss_parameter_supported": True,
            "response_types_supported": ["code"],
            "mtls_endpoint_aliases": {name: mtls + path for name, path in endpoints.items()},
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "tls_client_certificate_bound_access_tokens": True,
            "request_object_signing_alg_values_supported": ["PS256"],
            "token_endpoint_auth_signing_alg_values_supported": ["PS256"],
            "id_token_signing_alg_values_supported": ["PS256"],
            "authorization_signing_alg_values_supported": ["PS256"],
            "grant_types_supported": ["client_credentials", "authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "require_pushed_authorization_requests": True,
        }

    # -- TLS -----------------------------------------------------------------
    def context(self) -> ssl.SSLContext:
        b = self.behaviour
        key = (b.server_cert, b.client_auth, b.trust_client_ca)
        with self._lock:
            if key not in self._contexts:
                self._contexts[key] = self._make_context(*key)
            return self._contexts[key]

    def _credentials(self, kind: ServerCert) -> ServerCredentials:
        directory = self.state_dir / "server"
        if kind is ServerCert.UNKNOWN_CA:
            return TestCA(self.state_dir / "rogue-ca", "Rogue CA").server_credentials(directory)
        if kind is ServerCert.WRONG_HOST:
            return self.ca.server_credentials(directory, names=("bank.invalid",))
        return self.ca.server_credentials(directory, expired=kind is ServerCert.EXPIRED)

    def _make_context(self, kind: ServerCert, client_auth: bool, trust_client_ca: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        creds = self._credentials(kind)
        ctx.load_cert_chain(creds.cert_file, creds.key_file)
        if client_auth:
            ctx.verify_mode = ssl.CERT_REQUIRED
            trusted = self.ca if trust_client_ca else TestCA(self.state_dir / "other-ca", "Other CA")
            ctx.load_verify_locations(cafile=str(trusted.cert_file))
        return ctx

    # -- life cycle ----------------------------------------------------------
    def start(self) -> ModelBank:
        self.context()  # make the CA and the server certificate before the first client arrives
        self._thread = threading.Thread(target=self._server.serve_forever, name="modelbank", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> ModelBank:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], bank: ModelBank) -> None:
        self.bank = bank
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs here, in the connection's own thread, so a slow or failing
        # client never holds up the accept loop.
        sock: socket.socket = request
        sock.settimeout(30)
        try:
            tls = self.bank.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            tls.do_handshake()
        except (ssl.SSLError, OSError):
            return
        with self.bank._lock:
            self.bank.handshakes += 1
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a pooled client pays one handshake
    # Head and body are written separately: with Nagle, the body waits for the client's delayed ACK (40 ms).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the tests and the demo report what matters; stderr noise helps nobody

    @property
    def bank(self) -> ModelBank:
        return self.server.bank

    def _interaction_id(self) -> str:
        return self.headers.get("x-fapi-interaction-id", "")

    def _send(self, status: int, body: dict[str, Any] | None = None) -> None:
        if body is None:
            self._reply(Reply(status))
        else:
            self._reply(Reply.json(status, body))

    def _reply(self, reply: Reply) -> None:
        data = reply.body
        self.send_response(reply.status)
        if self.bank.behaviour.own_interaction_ids:
            own = str(uuid.uuid4())
            with self.bank._lock:
                self.bank.own_interaction_ids.append(own)
            self.send_header("x-fapi-interaction-id", own)
        elif self._interaction_id():
            self.send_header("x-fapi-interaction-id", self._interaction_id())
        if reply.content_type is not None:
            self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        if not self.bank.behaviour.keep_alive:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"errorCode": code, "errorMessage": message})

    def _record(self) -> None:
        der = self.connection.getpeercert(binary_form=True)
        with self.bank._lock:
            self.bank.requests.append((self.command, self.path, self._interaction_id()))
            self.bank.presented[self._interaction_id()] = hashlib.sha256(der).hexdigest() if der else None

    def _answer_routes(self, body: bytes) -> bool:
        """The first of the bank's route owners (token endpoint, JWKS, authorization, APIs) that answers."""
        der = self.connection.getpeercert(binary_form=True)
        headers = {k.lower(): v for k, v in self.headers.items()}
        for owner in self.bank.routes:
            answer = owner.handle(self.command, self.path, headers, body, der)
            if isinstance(answer, Reply):
                self._reply(answer)
                return True
            if answer is not None:
                self._send(*answer)
                return True
        return False

    def do_GET(self) -> None:
        self._record()
        if self._answer_routes(b""):
            return
        if self.path == DISCOVERY_PATH:
            with self.bank._lock:
                failing = self.bank.discovery_failures > 0
                self.bank.discovery_failures -= failing
            if failing:
                self._error(503, "Unavailable", "model bank told to fail discovery")
                return
            self._send(200, self.bank.discovery_document())
        else:
            self._error(404, "NotFound", f"no resource at {self.path}")

    def do_POST(self) -> None:
        self._record()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self._answer_routes(body):
            return
        if self.path not in (REGISTRATION_PATH, MTLS_PREFIX + REGISTRATION_PATH):
            self._error(404, "NotFound", f"no resource at {self.path}")
            return
        behaviour = self.bank.behaviour
        if behaviour.hang:
            self.bank.stopping.wait()
            self.close_connection = True
            return
        der = self.connection.getpeercert(binary_form=True)
        if der is None:
            self._error(401, "Unauthorized", "no client certificate presented")
            return
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            self._error(400, "BadRequest", "Content-Type must be application/json")
            return
        try:
            json.loads(body or b"{}")
        except ValueError:
            self._error(400, "BadRequest", "body is not JSON")
            return
        status = behaviour.registration_status
        if 200 <= status < 300:
            cert = x509.load_der_x509_certificate(der)
            registration = Registration(cert.subject.rfc4514_string(), hashlib.sha256(der).hexdigest(),
                                        self._interaction_id(), self.path, datetime.datetime.now(datetime.UTC))
            with self.bank._lock:
                self.bank.registrations.append(registration)
            if self.bank.on_registration is not None:
                self.bank.on_registration(registration)
            self._send(status, {"status": "registered"} if status != 204 else None)
        else:
            messages = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 500: "InternalServerError",
                        503: "ServiceUnavailable"}
            self._error(status, messages.get(status, "Error"), f"model bank configured to answer {status}")
