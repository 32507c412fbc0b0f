"""The versioned endpoints (``/v1/...``): each checks the policy, does one thing, answers JSON.

Errors carry a stable ``code`` (clients branch on it), a ``message``, a ``hint``
and the ``interaction_id`` that the request log line also carries.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

from asn1crypto import pem

from agent.audit import AuditError, KeyUse
from agent.daemon.app import Agent
from agent.daemon.http import HttpError, Request, Response
from agent.daemon.policy import PolicyDenied
from agent.errors import AgentError, InputError
from pkcs11_backends.errors import (
    AmbiguousKeyError,
    KeyNotFoundError,
    MechanismError,
    PinError,
    Pkcs11Error,
    TokenUnavailableError,
)
from pkcs11_backends.keys import SignatureScheme

_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
Route = Callable[[Agent, Request, dict[str, str]], Response]
_ROUTES: list[tuple[str, re.Pattern[str], Route]] = []


def route(method: str, pattern: str) -> Callable[[Route], Route]:
    compiled = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")

    def register(func: Route) -> Route:
        _ROUTES.append((method, compiled, func))
        return func

    return register


def handler(agent: Agent) -> Callable[[Request], Response]:
    def handle(request: Request) -> Response:
        allowed: list[str] = []
        for method, pattern, func in _ROUTES:
            match = pattern.match(request.path)
            if match is None:
                continue
            if method != request.method:
                allowed.append(method)
                continue
            try:
                return func(agent, request, match.groupdict())
            except HttpError:
                raise
            except PolicyDenied as exc:
                raise HttpError(403, "forbidden", str(exc), exc.hint) from None
            except (Pkcs11Error, AgentError) as exc:
                raise _http_error(exc) from None
        if allowed:
            raise HttpError(405, "method_not_allowed", f"{request.path} accepts {', '.join(allowed)}",
                            headers=(("Allow", ", ".join(allowed)),))
        raise HttpError(404, "not_found", f"no endpoint {request.path}", "see GET /v1/health, /v1/keys")

    return handle


def _http_error(exc: Pkcs11Error | AgentError) -> HttpError:
    hint = exc.hint or ""
    if isinstance(exc, KeyNotFoundError | AmbiguousKeyError):
        return HttpError(404 if isinstance(exc, KeyNotFoundError) else 409, "key_not_found", str(exc), hint)
    if isinstance(exc, MechanismError):
        return HttpError(400, "unsupported_algorithm", str(exc), hint)
    if isinstance(exc, PinError):
        return HttpError(503, "token_login_refused", str(exc), hint)
    if isinstance(exc, TokenUnavailableError):
        return HttpError(503, "token_unavailable", str(exc), hint, (("Retry-After", "1"),))
    if isinstance(exc, AuditError):
        return HttpError(500, "audit_unavailable", str(exc), hint)
    if isinstance(exc, InputError):
        return HttpError(400, "bad_input", str(exc), hint)
    return HttpError(500, "internal_error", str(exc), hint)


def _known_key(agent: Agent, alias: str) -> None:
    if alias not in agent.config.keys:
        raise HttpError(404, "unknown_key", f"no key {alias!r} is configured",
                        f"configured keys: {', '.join(sorted(agent.config.keys)) or 'none'}")


# -- health ------------------------------------------------------------------
@route("GET", "/v1/health")
def health(agent: Agent, request: Request, _: dict[str, str]) -> Response:
    request.log["operation"] = "health"
    return Response.json(200, {"status": "alive", "pid": os.getpid()})


@route("GET", "/v1/ready")
def ready(agent: Agent, request: Request, _: dict[str, str]) -> Response:
    request.log["operation"] = "ready"
    state = agent.readiness
    pool = agent.runtime.pool.health
    if state.ready and pool.ready:
        return Response.json(200, {"ready": True, "detail": state.detail, "keys": sorted(agent.config.keys)})
    detail = state.detail if not state.ready else pool.detail
    raise HttpError(503, "not_ready", f"not ready: {detail}", "see the agent's log; it recovers by itself",
                    (("Retry-After", "1"),))


# -- keys --------------------------------------------------------------------
@route("GET", "/v1/keys")
def list_keys(agent: Agent, request: Request, _: dict[str, str]) -> Response:
    request.log["operation"] = "keys"
    visible = agent.policy.permitted(request.peer, "keys", agent.config.keys)
    if not visible and agent.config.keys:
        agent.policy.check(request.peer, "keys", "*")
    result = []
    for alias in visible:
        key = agent.config.keys[alias]
        info = agent.runtime.keys.info(alias)
        result.append({"alias": alias, "uri": key.uri, "type": str(info.spec), "algorithms": list(key.algorithms),
                       "kid": key.kid, "certificate": info.certificate.as_dict() if info.certificate else None})
    return Response.json(200, {"keys": result})


@route("GET", "/v1/keys/{alias}/public")
def public_key(agent: Agent, request: Request, params: dict[str, str]) -> Response:
    alias = params["alias"]
    request.log.update(operation="public", key=alias)
    agent.policy.check(request.peer, "public", key=alias)
    _known_key(agent, alias)
    spki = agent.runtime.keys.public_key_info(alias)
    return Response(200, pem.armor("PUBLIC KEY", spki.dump()), content_type="application/x-pem-file")


@route("POST", "/v1/keys/{alias}/sign")
def sign(agent: Agent, request: Request, params: dict[str, str]) -> Response:
    alias = params["alias"]
    request.log.update(operation="sign", key=alias)
    agent.policy.check(request.peer, "sign", key=alias)
    _known_key(agent, alias)
    body = request.json()
    alg, data = body.get("alg"), _base64_field(body, "data_b64")
    if not isinstance(alg, str):
        raise HttpError(400, "missing_field", "field 'alg' (PS256, ES256, ES384 or RS256) is required")
    request.log["alg"] = alg
    key = agent.config.keys[alias]
    if alg not in key.algorithms:
        raise HttpError(403, "algorithm_not_allowed",
                        f"key {alias!r} may sign with {', '.join(key.algorithms) or 'no algorithm'}, not {alg!r}",
                        f"add {alg!r} to [keys.{alias}] algorithms if this key should make {alg} signatures")
    scheme = SignatureScheme.from_jose(alg)
    use = KeyUse(request.peer.uid, request.peer.pid, key.uri, "sign", alg, data, "ok", request.interaction_id)
    try:
        signature = agent.runtime.keys.sign(alias, data, scheme)
    except (Pkcs11Error, AgentError) as exc:
        agent.audit.record(dataclasses.replace(use, result=f"error: {type(exc).__name__}"))
        raise
    # The signature leaves only once its audit record is on disk.
    agent.audit.record(use)
    return Response.json(200, {"key": alias, "kid": key.kid, "alg": alg,
                               "signature_b64": base64.b64encode(signature).decode("ascii")})


def _base64_field(body: dict[str, Any], name: str) -> bytes:
    value = body.get(name)
    if not isinstance(value, str):
        raise HttpError(400, "missing_field", f"field {name!r} (base64 of the bytes to sign) is required")
    try:
        if _BASE64URL.match(value) and ("-" in value or "_" in value):
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "bad_base64", f"field {name!r} is not base64") from None
