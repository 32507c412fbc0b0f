"""Bank endpoints: discovery, registration, tokens, PAR and the forward call, each for a configured bank only.

The forward call is no open proxy: the URL is built from the bank's configured
origin (``issuer``, ``discovery_url``, and the endpoints of its verified discovery
document), redirects are returned to the caller, never followed, and the mTLS
connection carries the bank's own CA bundle and client key.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlsplit

from agent.daemon.app import Agent
from agent.daemon.audited import on_behalf_of
from agent.daemon.http import HttpError, Request, Response, base64_field
from agent.daemon.routing import route
from agent.jose import CLIENT_ASSERTION_TYPE

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
# Set by the transport, or meaningless across the hop.
_DROPPED_HEADERS = frozenset({"host", "connection", "keep-alive", "content-length", "transfer-encoding", "upgrade",
                              "proxy-authorization", "te", "trailer", "x-fapi-interaction-id"})


@route("GET", "/v1/banks/{bank}/discovery", remote=True)
def discovery(agent: Agent, request: Request, params: dict[str, str]) -> Response:
    bank = params["bank"]
    request.log.update(operation="discovery", bank=bank)
    agent.policy.check(request.peer, "discovery", bank=bank)
    discovery = agent.openfinance.discovery(bank)
    before = discovery.cached()
    with on_behalf_of(request, "discovery"):
        document = discovery.get(refresh=request.query.get("refresh") in ("1", "true"))
    return Response.json(200, {**document.as_dict(),
                               "fetched_now": before is None or before.fetched_at != document.fetched_at,
                               "cache_file": str(discovery.cache_file),
                               "use_mtls_aliases": discovery.bank.use_mtls_aliases})


@route("POST", "/v1/banks/{bank}/registration", remote=True)
def registration(agent: Agent, request: Request, params: dict[str, str]) -> Response:
    bank = params["bank"]
    request.log.update(operation="register", bank=bank)
    agent.policy.check(request.peer, "register", bank=bank)
    force = request.json().get("force", False) if request.body else False
    if not isinstance(force, bool):
        raise HttpError(400, "bad_field", "field 'force' must be true or false")
    with on_behalf_of(request, "register"):
        result = agent.openfinance.registrar(bank).register(force=force)
    return Response.json(200, result.as_dict())


@route("POST", "/v1/banks/{bank}/client-assertion", remote=True)  # it may fetch discovery
def client_assertion(agent: Agent, request: Request, params: dict[str, str]) -> Response:
    """A fresh client assertion (``aud`` = the bank's issuer), for a caller that posts to the bank itself."""
    bank = params["bank"]
    request.log.update(operation="client_assertion", bank=bank)
    agent.policy.check(request.peer, "client_assertion", bank=bank)
    tokens = agent.openfinance.tokens(bank)
    with on_behalf_of(request, "client_assertion"):
        assertion = tokens.client_assertion()
    return Response.json(200, {"bank": bank, "client_id": tokens.client_id, "client_assertion": assertion,
                               "client_assertion_type": CLIENT_ASSERTION_TYPE})


@route("POST", "/v1/banks/{bank}/token", remote=True)
def token(agent: Agent, request: Request, params: dict[str, str]) -> Response:
    """An access token for ``{"scope": ...}``: cached per bank and scope, else fetched with a fresh assertion.

    The token goes back to the caller (that is the point) and nowhere else: not the log, not the audit trail.
    """
    bank = params["bank"]
    request.log.update(operation="token", bank=bank)
    agent.policy.check(request.peer, "token", bank=bank)
    body = request.json()
    scope, refresh = body.get("scope"), body.get("refresh", False)
    if not isinstance(scope, str) or not scope.strip():
        raise HttpError(400, "missing_field", "field 'scope' (space-separated scopes, e.g. \"accounts\") is required")
    if not isinstance(refresh, bool):
        raise HttpError(400, "bad_field", "field 'refresh' must be true or false")
    request.log["scope"] = scope
    with on_behalf_of(request, "token"):
        issued = agent.openfinance.tokens(bank).token(scope, refresh=refresh)
    return Response.json(200, issued.as_dict())


@route("POST", "/v1/banks/{bank}/par", remote=True)
def par(agent: Agent, request: Request, params: dict[str, str]) -> Response:
    """Sign a request object and push it; the ``request_uri`` and the PKCE verifier, state, nonce come back."""
    bank = params["bank"]
    request.log.update(operation="par", bank=bank)
    agent.policy.check(request.peer, "par", bank=bank)
    body = request.json()
    fields: dict[str, Any] = {name: body.get(name) for name in ("scope", "redirect_uri", "state", "nonce")}
    for name, value in fields.items():
        if (value is not None or name in ("scope", "redirect_uri")) and not isinstance(value, str):
            raise HttpError(400, "missing_field" if value is None else "bad_field", f"field {name!r} must be a string")
    details = body.get("authorization_details")
    if details is not None and not (isinstance(details, list) and all(isinstance(d, dict) for d in details)):
        raise HttpError(400, "bad_field", "field 'authorization_details' must be a list of objects")
    with on_behalf_of(request, "par"):
        pushed = agent.openfinance.tokens(bank).push_authorization(authorization_details=details, **fields)
    return Response.json(200, pushed.as_dict())


@route("POST", "/v1/banks/{bank}/forward", remote=True)
def forward(agent: Agent, request: Request, params: dict[str, str]) -> Response:
    bank = params["bank"]
    request.log.update(operation="forward", bank=bank)
    agent.policy.check(request.peer, "forward", bank=bank)
    body = request.json()
    method = body.get("method")
    if method not in _METHODS:
        raise HttpError(400, "bad_field", f"field 'method' must be one of {', '.join(sorted(_METHODS))}")
    url = _bank_url(agent, bank, body.get("path"), body.get("url"))
    headers = body.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise HttpError(400, "bad_field", "field 'headers' must be an object of strings")
    if any("\r" in k + v or "\n" in k + v for k, v in headers.items()):
        raise HttpError(400, "bad_field", "header names and values must not contain line breaks")
    sent = {k: v for k, v in headers.items() if k.lower() not in _DROPPED_HEADERS}
    data = base64_field(body, "body_b64") if "body_b64" in body else None
    request.log["method_forwarded"] = method
    with on_behalf_of(request, "forward"):
        answer = agent.openfinance.http(bank).request(method, url, body=data, headers=sent,
                                                      interaction_id=request.interaction_id)
    return Response.json(200, {"status": answer.status, "headers": dict(answer.headers),
                               "body_b64": base64.b64encode(answer.body).decode("ascii"),
                               "interaction_id": answer.interaction_id, "url": url})


# The last answer per bank, with the configuration and document it came from (compared by identity).
_ORIGINS: dict[str, tuple[object, object, list[str]]] = {}


def allowed_origins(agent: Agent, bank: str) -> list[str]:
    """Where requests to ``bank`` may go: its configured origins and its verified discovery document's."""
    config = agent.openfinance.bank(bank)
    cached = agent.openfinance.discovery(bank).cached()
    known = _ORIGINS.get(bank)
    if known is not None and known[0] is config and known[1] is cached:
        return known[2]
    urls = [config.issuer, config.discovery_url]
    if cached is not None:
        document = cached.document
        urls += [v for v in document.values() if isinstance(v, str)]
        aliases = document.get("mtls_endpoint_aliases")
        if isinstance(aliases, dict):
            urls += [v for v in aliases.values() if isinstance(v, str)]
    origins = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme == "https" and parts.netloc and "@" not in parts.netloc:
            origin = f"https://{parts.netloc.lower()}"
            if origin not in origins:
                origins.append(origin)
    _ORIGINS[bank] = (config, cached, origins)
    return origins


def _bank_url(agent: Agent, bank: str, path: object, url: object) -> str:
    origins = allowed_origins(agent, bank)
    if isinstance(path, str) and url is None:
        if not path.startswith("/") or path.startswith("//") or any(c in path for c in " \r\n#\\"):
            raise HttpError(400, "bad_path", f"path {path[:80]!r} must be an absolute path like /open-finance/...")
        return origins[0] + path
    if isinstance(url, str) and path is None:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc.lower()}"
        if parts.scheme != "https" or "@" in parts.netloc or origin not in origins or any(c in url for c in " \r\n"):
            raise HttpError(400, "host_not_allowed", f"{origin} is not an endpoint of bank {bank!r}",
                            f"the agent forwards only to {', '.join(origins)}")
        return url.split("#", 1)[0]
    raise HttpError(400, "missing_field", "give exactly one of 'path' (on the bank's issuer host) or 'url'")
