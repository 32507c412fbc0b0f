"""The model bank's token, PAR and one protected resource endpoint, as strict as an Al Tareq bank.

Test infrastructure, not product. A TPP's signing keys are known the way a bank knows them: from the
directory's JWKS for the client (here ``register_client(client_id, jwks)``, what the directory would serve, or
a file ``<client_id>.json`` in the ``directory`` folder, read when an unknown client first authenticates: how
the demo, in another process, publishes its JWKS).
The client assertion is checked against that JWKS, never against the mTLS certificate's key, because the
ecosystem uses a separate signing certificate.

Client authentication (``/token`` and ``/par``), in order:

* mutual TLS with a client certificate whose subject CN is the client_id (the bank identifies a TPP by its
  transport certificate) and which was registered at ``/tpp-registration`` (when ``require_registration``);
* ``client_assertion_type`` = jwt-bearer; header ``alg`` = PS256 exactly; ``kid`` in the client's JWKS;
  signature; ``iss`` = ``sub`` = client_id; ``aud`` = the issuer; ``exp`` - ``iat`` ≤ 300 s; ``iat``/``nbf`` at
  most 10 s in the future; ``exp`` not passed; ``jti`` never seen before (kept until its ``exp``).

Tokens are opaque, certificate-bound (RFC 8705): the bank records ``cnf.x5t#S256`` of the mTLS certificate and
``GET /accounts`` accepts the token only over a connection with that same certificate.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import hashlib
import json
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.x509.oid import NameOID

TOKEN_PATH = "/token"
PAR_PATH = "/par"
RESOURCE_PATH = "/accounts"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME = 300
MAX_REQUEST_WINDOW = 600
SKEW = 10
Answer = tuple[int, dict[str, Any]]
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.description = status, error, description

    def answer(self) -> Answer:
        return self.status, {"error": self.error, "error_description": self.description}


def _invalid_client(description: str) -> OAuthError:
    return OAuthError(401, "invalid_client", description)


@dataclasses.dataclass(frozen=True)
class IssuedToken:
    client_id: str
    scope: str
    cnf_x5t_s256: str
    expires_at: float
    consent_id: str | None = None  # tokens of the authorization code flow belong to a consent


# A grant handler: (form, authenticated client_id, client certificate DER) → the token answer.
Grant = Callable[[dict[str, str], str, bytes], "Answer"]
_PKCE_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
_PROMPTS = {"none", "login", "consent", "select_account"}


@dataclasses.dataclass(frozen=True)
class PushedRequest:
    client_id: str
    claims: dict[str, Any]
    expires_at: float
    request: str  # the signed request object as received, for tests that read it back with another library


def x5t_s256(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


class TokenEndpoint:
    """State and checks of the token side of one model bank; ``handle`` is its only entry from HTTP."""

    def __init__(self, issuer: Callable[[], str], registered: Callable[[str], bool]) -> None:
        self._issuer = issuer
        self._registered = registered  # sha256 hex of a client certificate → was it registered?
        self.require_registration = True
        self.token_lifetime = 300
        self.par_lifetime = 60
        self.clients: dict[str, dict[str, jwt.PyJWK]] = {}
        self.encryption_keys: dict[str, dict[str, Any]] = {}  # client id → its use: enc JWK
        self.issued: dict[str, IssuedToken] = {}
        self.pushed: dict[str, PushedRequest] = {}
        self.refusals: list[tuple[str, str]] = []  # (path, error_description), for the tests' asserts
        # The client assertions accepted, as received (the latest ones), for tests that read them back.
        self.assertions: collections.deque[str] = collections.deque(maxlen=1000)
        self.directory: Path | None = None
        self.on_token: Callable[[IssuedToken], None] | None = None
        self.require_resource = False  # True: a PAR without resource is refused (as a strict RAR bank does)
        # grant_type → handler; modelbank/authorization.py adds authorization_code and refresh_token.
        self.grants: dict[str, Grant] = {"client_credentials": self._client_credentials}
        self._jti_seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def register_client(self, client_id: str, jwks: Mapping[str, Any]) -> None:
        """What the directory would tell the bank: the client's public JWKS (``use: sig`` keys verify its JWTs,
        its ``use: enc`` key is what events are encrypted to)."""
        keys = {k["kid"]: jwt.PyJWK.from_dict(dict(k)) for k in jwks["keys"] if k.get("use", "sig") == "sig"}
        encryption = [dict(k) for k in jwks["keys"] if k.get("use") == "enc"]
        with self._lock:
            self.clients[client_id] = keys
            if encryption:  # the key the bank's events are encrypted to
                self.encryption_keys[client_id] = encryption[0]

    # -- HTTP ------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               client_cert: bytes | None) -> Answer | None:
        """An answer for the paths this module owns (also under ``/mtls``), else None. Header names in lower case."""
        route = path.split("?", 1)[0].removeprefix("/mtls")
        handlers = {("POST", TOKEN_PATH): self._token, ("POST", PAR_PATH): self._par}
        try:
            if (method, route) in handlers:
                if headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
                    raise OAuthError(400, "invalid_request", "Content-Type must be application/x-www-form-urlencoded")
                form = _form(body)
                return handlers[(method, route)](form, client_cert)
            if (method, route) == ("GET", RESOURCE_PATH):
                return self._resource(headers.get("authorization", ""), client_cert)
        except OAuthError as exc:
            with self._lock:
                self.refusals.append((route, exc.description))
            return exc.answer()
        return None

    # -- endpoints -------------------------------------------------------------------
    def _token(self, form: dict[str, str], cert: bytes | None) -> Answer:
        client_id = self._authenticate(form, cert)
        grant = self.grants.get(form.get("grant_type", ""))
        if grant is None:
            raise OAuthError(400, "unsupported_grant_type", f"grant_type must be one of {', '.join(self.grants)}")
        assert cert is not None
        return grant(form, client_id, cert)

    def _client_credentials(self, form: dict[str, str], client_id: str, cert: bytes) -> Answer:
        scope = form.get("scope", "").strip()
        if not scope:
            raise OAuthError(400, "invalid_scope", "scope is required")
        token, _ = self.issue(client_id, scope, cert)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime, "scope": scope}

    def issue(self, client_id: str, scope: str, cert: bytes, consent_id: str | None = None) -> tuple[str, IssuedToken]:
        """A new access token bound to ``cert`` (cnf.x5t#S256)."""
        token = secrets.token_urlsafe(32)
        issued = IssuedToken(client_id, scope, x5t_s256(cert), time.time() + self.token_lifetime, consent_id)
        with self._lock:
            self.issued[token] = issued
        if self.on_token is not None:
            self.on_token(issued)
        return token, issued

    def revoke(self, consent_id: str) -> None:
        """Every access token of a consent stops working."""
        with self._lock:
            self.issued = {t: i for t, i in self.issued.items() if i.consent_id != consent_id}

    def _par(self, form: dict[str, str], cert: bytes | None) -> Answer:
        client_id = self._authenticate(form, cert)
        request = form.get("request")
        if not request:
            raise OAuthError(400, "invalid_request", "request (a signed request object) is required")
        claims = self.verify_client_jwt(request, client_id, "request object", 400, "invalid_request_object")
        now = time.time()
        if claims["exp"] - claims["nbf"] > MAX_REQUEST_WINDOW:
            raise OAuthError(400, "invalid_request_object", "request object: exp - nbf exceeds 600 s")
        problems = [
            (claims.get("client_id", client_id) != client_id, "client_id differs from iss"),
            (claims.get("response_type") != "code", "response_type must be code"),
            (claims.get("code_challenge_method") != "S256"
             or not _PKCE_CHALLENGE.fullmatch(str(claims.get("code_challenge", ""))), "PKCE S256 required"),
            (not str(claims.get("redirect_uri", "")).startswith("https://"), "redirect_uri must be https"),
            *((not claims.get(name), f"{name} is required") for name in ("scope", "state")),
            # OIDC Core §3.1.2.1: nonce belongs to an OpenID request; without openid it means nothing.
            (_openid(claims) and not claims.get("nonce"), "nonce is required with scope openid"),
            (not _openid(claims) and "nonce" in claims, "nonce without scope openid"),
            *_optional_parameter_problems(claims),
            (self.require_resource and "resource" not in claims, "resource is required"),
        ]
        for broken, why in problems:
            if broken:
                raise OAuthError(400, "invalid_request_object", f"request object: {why}")
        uri = "urn:ietf:params:oauth:request_uri:" + secrets.token_urlsafe(24)
        with self._lock:
            self.pushed[uri] = PushedRequest(client_id, claims, now + self.par_lifetime, request)
        return 201, {"request_uri": uri, "expires_in": self.par_lifetime}

    def _resource(self, authorization: str, cert: bytes | None) -> Answer:
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            issued = self.issued.get(token) if scheme.lower() == "bearer" else None
        if issued is None or issued.expires_at < time.time():
            raise OAuthError(401, "invalid_token", "unknown or expired access token")
        if cert is None or x5t_s256(cert) != issued.cnf_x5t_s256:
            raise OAuthError(401, "invalid_token", "token is bound to another client certificate (cnf.x5t#S256)")
        return 200, {"Data": {"Account": []}, "client_id": issued.client_id, "scope": issued.scope}

    # -- client authentication -----------------------------------------------------
    def _authenticate(self, form: dict[str, str], cert: bytes | None) -> str:
        if cert is None:
            raise _invalid_client("mutual TLS with the transport certificate is required")
        if form.get("client_assertion_type") != ASSERTION_TYPE or not form.get("client_assertion"):
            raise _invalid_client("private_key_jwt is required (client_assertion_type jwt-bearer)")
        assertion = form["client_assertion"]
        try:
            client_id = jwt.decode(assertion, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError as exc:
            raise _invalid_client(f"client_assertion is not a JWT: {exc}") from None
        if isinstance(client_id, str) and client_id not in self.clients:
            self._look_up(client_id)
        if not isinstance(client_id, str) or client_id not in self.clients:
            raise _invalid_client(f"unknown client {client_id!r}")
        if "client_id" in form and form["client_id"] != client_id:
            raise _invalid_client("client_id differs from the assertion's iss")
        subject = x509.load_der_x509_certificate(cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not subject or subject[0].value != client_id:
            raise _invalid_client("the client certificate's CN is not the assertion's client_id")
        if self.require_registration and not self._registered(hashlib.sha256(cert).hexdigest()):
            raise _invalid_client("this client certificate was never registered at /tpp-registration")
        claims = self.verify_client_jwt(assertion, client_id, "client assertion", 401, "invalid_client")
        if claims.get("sub") != client_id:
            raise _invalid_client("client assertion: sub must equal iss")
        if claims["exp"] - claims["iat"] > MAX_ASSERTION_LIFETIME:
            raise _invalid_client("client assertion: lifetime (exp - iat) exceeds 300 s")
        jti = claims["jti"]
        now = time.time()
        with self._lock:
            self._jti_seen = {j: exp for j, exp in self._jti_seen.items() if exp + SKEW >= now}
            if jti in self._jti_seen:
                raise _invalid_client("client assertion replayed (jti already used)")
            self._jti_seen[jti] = claims["exp"]
            self.assertions.append(assertion)
        return client_id

    def _look_up(self, client_id: str) -> None:
        """The directory's JWKS for a client, if the directory folder has one."""
        if self.directory is None or not _SAFE_NAME.fullmatch(client_id):
            return
        with contextlib.suppress(FileNotFoundError):
            self.register_client(client_id, json.loads((self.directory / f"{client_id}.json").read_text()))

    def verify_client_jwt(self, token: str, client_id: str, what: str, status: int, code: str) -> dict[str, Any]:
        def refuse(why: str) -> OAuthError:
            return OAuthError(status, code, f"{what}: {why}")

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise refuse(f"unreadable header: {exc}") from None
        if header.get("alg") != "PS256":
            raise refuse(f"alg must be PS256, got {header.get('alg')!r}")
        key = self.clients[client_id].get(str(header.get("kid")))
        if key is None:
            raise refuse(f"kid {header.get('kid')!r} is not in the client's JWKS")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=["PS256"], audience=self._issuer(), issuer=client_id, leeway=SKEW,
                options={"require": ["iss", "aud", "exp", "iat"] + (["jti"] if what == "client assertion"
                                                                    else ["nbf"])})
        except jwt.PyJWTError as exc:
            raise refuse(str(exc)) from None
        return claims


def _optional_parameter_problems(claims: dict[str, Any]) -> list[tuple[bool, str]]:
    """resource (RFC 8707), prompt, max_age, acr_values, claims (OIDC), authorization_details (RFC 9396)."""
    resource = claims.get("resource")
    resources = resource if isinstance(resource, list) else [resource]
    prompt = claims.get("prompt")
    details = claims.get("authorization_details")
    return [
        ("resource" in claims and not all(isinstance(r, str) and "://" in r and "#" not in r for r in resources),
         "resource must be an absolute URI (or a list of them)"),
        ("prompt" in claims and (not isinstance(prompt, str) or not set(prompt.split()) <= _PROMPTS
                                 or ("none" in prompt.split() and prompt.strip() != "none")), "prompt is invalid"),
        ("max_age" in claims and (not isinstance(claims["max_age"], int) or claims["max_age"] < 0),
         "max_age must be a non-negative integer"),
        ("acr_values" in claims and not isinstance(claims["acr_values"], str), "acr_values must be a string"),
        ("claims" in claims and not isinstance(claims["claims"], dict), "claims must be an object"),
        (details is not None and (not isinstance(details, list) or not details
                                  or not all(isinstance(d, dict) and isinstance(d.get("type"), str) for d in details)),
         "authorization_details must be a non-empty array of objects with a type"),
    ]


def _form(body: bytes) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qs(body.decode("ascii"), strict_parsing=bool(body), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError(400, "invalid_request", "body is not a form") from None
    if any(len(v) > 1 for v in pairs.values()):
        raise OAuthError(400, "invalid_request", "a form parameter is repeated")
    return {k: v[0] for k, v in pairs.items()}


def _openid(claims: dict[str, Any]) -> bool:
    return "openid" in str(claims.get("scope", "")).split()
