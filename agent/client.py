"""A small client for the agent's Unix socket, for Python services and the CLI.

::

    from agent.client import AgentClient
    agent = AgentClient("/run/tpp-agent/agent.sock")
    signature = agent.sign("signing", b"header.payload", "PS256")
    token = agent.token("examplebank", "accounts")["access_token"]

One keep-alive connection per thread; a connection the agent closed (idle timeout,
restart) is reopened once, transparently, for requests that are safe to repeat.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import AgentError

DEFAULT_SOCKET = Path("/run/tpp-agent/agent.sock")


class AgentUnavailableError(AgentError):
    hint = "start the agent (systemctl start tpp-agent) or pass the right socket path"


class UntrustedAgentError(AgentUnavailableError):
    """Something answers on the socket path, but not as the agent's user: nothing is sent to it."""

    hint = ("another program holds the agent's socket path: stop it, check the socket's directory (it must be the "
            "agent's, e.g. /run/tpp-agent owned by the tpp-agent user), then start the agent")


class AgentRequestError(AgentError):
    """The agent answered with an error; ``code`` is stable, ``interaction_id`` finds its log line."""

    def __init__(self, status: int, code: str, message: str, hint: str, interaction_id: str) -> None:
        super().__init__(message, hint or None)
        self.status = status
        self.code = code
        self.interaction_id = interaction_id

    def __str__(self) -> str:
        return f"{super().__str__()} ({self.code}, interaction {self.interaction_id})"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float, server_uid: int | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path
        self._server_uid = server_uid

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
            check_server(sock, self._path, self._server_uid)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def check_server(sock: socket.socket, path: str, expected: int | None) -> None:
    """The process serving ``sock`` (``SO_PEERCRED``) runs as the agent's user, or as root.

    The agent's user is ``expected``, else the owner of the socket's directory: whoever may create the socket
    there is the agent (systemd's RuntimeDirectory= belongs to its User=). A stranger's socket at that path
    would otherwise receive the caller's payloads and hand back signatures of its own choosing.
    """
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if expected is None:
        expected = os.stat(os.path.dirname(os.path.abspath(path))).st_uid
    if uid not in (0, expected):
        raise UntrustedAgentError(f"the socket {path} is served by uid {uid}, not by the agent's user (uid {expected})")


class AgentClient:
    def __init__(self, socket_path: str | Path | None = None, timeout: float = 30.0, *,
                 server_uid: int | None = None) -> None:
        """``server_uid``: the agent's user; default: the owner of the socket's directory (see check_server)."""
        self.socket_path = str(socket_path or os.environ.get("TPP_AGENT_SOCKET") or DEFAULT_SOCKET)
        self.timeout = timeout
        self.server_uid = server_uid
        self._local = threading.local()

    # -- endpoints -----------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/v1/health")

    def ready(self) -> dict[str, Any]:
        return self._json("GET", "/v1/ready")

    def list_keys(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/v1/keys")["keys"]
        return result

    def public_key_pem(self, alias: str) -> str:
        return self.call("GET", f"/v1/keys/{alias}/public")[1].decode("ascii")

    def sign(self, alias: str, data: bytes, alg: str) -> bytes:
        body = {"alg": alg, "data_b64": base64.b64encode(data).decode("ascii")}
        return base64.b64decode(self._json("POST", f"/v1/keys/{alias}/sign", body)["signature_b64"])

    def public_jwk(self, alias: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/keys/{alias}/public?format=jwk")

    def jwks(self) -> dict[str, Any]:
        """The JWK Set of the configured keys this caller may read."""
        return self._json("GET", "/v1/jwks")

    def jws(self, alias: str, payload: bytes, alg: str | None = None,
            header: Mapping[str, Any] | None = None) -> str:
        """A compact JWS over ``payload`` signed on the token (``alg`` default: the key's first allowed)."""
        body: dict[str, Any] = {"payload_b64": base64.b64encode(payload).decode("ascii")}
        if alg is not None:
            body["alg"] = alg
        if header is not None:
            body["header"] = dict(header)
        return str(self._json("POST", f"/v1/keys/{alias}/jws", body)["jws"])

    def csr(self, alias: str, subject: str, alg: str | None = None) -> str:
        """A PEM CSR for the key (admins only); ``alg``: rsa-pkcs1, rsa-pss or ecdsa (default by key type)."""
        body = {"subject": subject, **({"alg": alg} if alg else {})}
        return str(self._json("POST", f"/v1/keys/{alias}/csr", body)["pem"])

    # Bank operations take the caller's interaction_id (a UUID): the agent sends it to the bank and answers with it.
    def discovery(self, bank: str, refresh: bool = False, *, interaction_id: str | None = None) -> dict[str, Any]:
        return self._json("GET", f"/v1/banks/{bank}/discovery" + ("?refresh=1" if refresh else ""),
                          interaction_id=interaction_id)

    def register(self, bank: str, force: bool = False, *, interaction_id: str | None = None) -> dict[str, Any]:
        return self._json("POST", f"/v1/banks/{bank}/registration", {"force": force}, interaction_id=interaction_id)

    def client_assertion(self, bank: str, *, interaction_id: str | None = None) -> dict[str, Any]:
        """``{"client_assertion", "client_assertion_type", "client_id", "bank"}``: fresh, single use."""
        return self._json("POST", f"/v1/banks/{bank}/client-assertion", {}, interaction_id=interaction_id)

    def token(self, bank: str, scope: str, refresh: bool = False, *,
              interaction_id: str | None = None) -> dict[str, Any]:
        """A client_credentials token ``{"access_token", "token_type", "expires_in", "scope", ...}``, cached by
        the agent per bank and scope; ``refresh`` only skips that cache (no refresh_token grant: that is
        :meth:`consent_refresh`)."""
        return self._json("POST", f"/v1/banks/{bank}/token", {"scope": scope, "refresh": refresh},
                          interaction_id=interaction_id)

    def par(self, bank: str, scope: str, redirect_uri: str, *,
            authorization_details: list[dict[str, Any]] | None = None,
            state: str | None = None, nonce: str | None = None, interaction_id: str | None = None,
            **parameters: Any) -> dict[str, Any]:
        """Start a consent: ``{"authorization_url", "request_uri", "expires_in", "state", ...}``.

        Send the customer to ``authorization_url``; the agent keeps the PKCE verifier and nonce (10 minutes).
        ``parameters``: ``resource`` (a list of URIs), ``prompt``, ``max_age``, ``acr_values``, ``claims``.
        """
        body = {"scope": scope, "redirect_uri": redirect_uri, "authorization_details": authorization_details,
                "state": state, "nonce": nonce, **parameters}
        return self._json("POST", f"/v1/banks/{bank}/par", {k: v for k, v in body.items() if v is not None},
                          interaction_id=interaction_id)

    def consent_callback(self, bank: str, redirect: str | Mapping[str, str], *,
                         interaction_id: str | None = None) -> dict[str, Any]:
        """Complete a consent from the bank's redirect (its URL or query string as received, or its parameters):
        ``{"access_token", "refresh_token", "expires_in", "id_token_claims", "authorization_details", ...}``.

        Keep ``refresh_token``: it is the consent's (see :meth:`consent_refresh`)."""
        body = {"url": redirect} if isinstance(redirect, str) else {"params": dict(redirect)}
        return self._json("POST", f"/v1/banks/{bank}/consent/callback", body, interaction_id=interaction_id)

    def consent_refresh(self, bank: str, refresh_token: str, *, interaction_id: str | None = None) -> dict[str, Any]:
        """New tokens for a consent. Store the answer's ``refresh_token`` in place of the one given *before*
        using the new access token: a replayed old one revokes the consent at a strict bank."""
        return self._json("POST", f"/v1/banks/{bank}/consent/refresh", {"refresh_token": refresh_token},
                          interaction_id=interaction_id)

    def forward(self, bank: str, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None, *, interaction_id: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """Send a request to the bank over the agent's mTLS; returns the bank's (status, headers, body)."""
        request: dict[str, Any] = {"method": method, "headers": headers or {}}
        request["url" if path.startswith("https://") else "path"] = path
        if body is not None:
            request["body_b64"] = base64.b64encode(body).decode("ascii")
        answer = self._json("POST", f"/v1/banks/{bank}/forward", request, interaction_id=interaction_id)
        return int(answer["status"]), dict(answer["headers"]), base64.b64decode(answer["body_b64"])

    def verify(self, bank: str, jws: str, *, audience: bool = True) -> dict[str, Any]:
        """The bank's JWS verified: ``{"bank", "kid", "header", "claims"}``; AgentRequestError (code
        ``bad_signature``, ``unknown_kid``, ``expired``, ``wrong_audience``…) when it does not pass."""
        return self._json("POST", f"/v1/banks/{bank}/verify", {"jws": jws, "audience": audience})

    def signed_body(self, bank: str, message: Mapping[str, Any], *, audience: str = "array",
                    lifetime: int | None = None) -> str:
        """A JWT request body (``application/jwt``) signed on the token; ``audience``: "array" or "string"."""
        body: dict[str, Any] = {"message": dict(message), "audience": audience}
        if lifetime is not None:
            body["lifetime"] = lifetime
        return str(self._json("POST", f"/v1/banks/{bank}/signed-body", body)["jwt"])

    def encrypt_personal_data(self, bank: str, data: Mapping[str, Any], *, lifetime: int | None = None) -> str:
        """``data`` signed on the token (JWS), encrypted to the bank's ``use: enc`` key (compact JWE)."""
        body: dict[str, Any] = {"data": dict(data)}
        if lifetime is not None:
            body["lifetime"] = lifetime
        return str(self._json("POST", f"/v1/banks/{bank}/personal-data", body)["jwe"])

    def receive_event(self, bank: str, jwe: str | bytes, content_type: str | None = None) -> dict[str, Any]:
        """An event the bank POSTed to the webhook, decrypted on the token, verified and checked against replay:
        ``{"event_type", "consent_id", "resource", "event_time", "message", "claims", "jti", "bank"}``."""
        body: dict[str, Any] = {"jwe": jwe.decode("ascii", "replace") if isinstance(jwe, bytes) else jwe}
        if content_type is not None:
            body["content_type"] = content_type
        return self._json("POST", f"/v1/banks/{bank}/events", body)

    def close(self) -> None:
        conn: _UnixConnection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- plumbing ------------------------------------------------------------
    def _json(self, method: str, path: str, body: dict[str, Any] | None = None, *,
              interaction_id: str | None = None) -> dict[str, Any]:
        headers = {"x-fapi-interaction-id": interaction_id} if interaction_id else None
        _, payload = self.call(method, path, body, headers=headers)
        value: dict[str, Any] = json.loads(payload)
        return value

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One request (``path`` with its query); the status and body of a success, else AgentRequestError.

        ``headers``: e.g. ``x-fapi-interaction-id`` (a UUID), which the agent then sends to the bank and answers.
        """
        data = json.dumps(body).encode("utf-8") if body is not None else None
        headers = {**({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})}
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # The agent closed an idle keep-alive connection: reopen once. Nothing reached a key.
                self.close()
                if attempt == 2:
                    raise AgentUnavailableError(f"agent at {self.socket_path} closed the connection: {exc}") from None
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                self.close()
                raise AgentUnavailableError(f"no agent listening on {self.socket_path} ({exc.strerror})") from None
            except PermissionError:
                self.close()
                raise AgentUnavailableError(f"not allowed to connect to {self.socket_path}",
                                            hint="the socket is for the tpp-agent group: add this user to it") from None
            except (TimeoutError, OSError) as exc:
                self.close()
                raise AgentUnavailableError(f"agent at {self.socket_path} did not answer: {exc}") from None
        if response.will_close:
            self.close()
        if response.status >= 400:
            raise _error(response.status, payload)
        return response.status, payload

    def _connection(self) -> _UnixConnection:
        conn: _UnixConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _UnixConnection(self.socket_path, self.timeout, self.server_uid)
        return conn


def _error(status: int, payload: bytes) -> AgentRequestError:
    try:
        body = json.loads(payload)
        error = AgentRequestError(status, str(body["code"]), str(body["message"]), str(body.get("hint", "")),
                                  str(body.get("interaction_id", "")))
        if isinstance(body.get("bank_interaction_id"), str):
            error.bank_interaction_id = body["bank_interaction_id"]
        return error
    except (ValueError, KeyError, TypeError):
        return AgentRequestError(status, "http_error", f"agent answered HTTP {status}", "", "")
