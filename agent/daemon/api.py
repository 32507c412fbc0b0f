"""Health, readiness and key endpoints (``/v1/health``, ``/v1/ready``, ``/v1/keys/...``)."""

from __future__ import annotations

import base64
import dataclasses
import os

from asn1crypto import pem

from agent.audit import KeyUse
from agent.daemon.app import Agent
from agent.daemon.http import HttpError, Request, Response, base64_field
from agent.daemon.routing import route
from agent.errors import AgentError
from agent.x509.csr import build_csr
from agent.x509.subject import parse_subject
from pkcs11_backends.errors import Pkcs11Error
from pkcs11_backends.keys import SignatureScheme


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
    alg, data = body.get("alg"), base64_field(body, "data_b64")
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


@route("POST", "/v1/keys/{alias}/csr")
def csr(agent: Agent, request: Request, params: dict[str, str]) -> Response:
    """A PKCS#10 request for the key, signed on the token (admins only)."""
    alias = params["alias"]
    request.log.update(operation="csr", key=alias)
    agent.policy.check(request.peer, "csr", key=alias)
    _known_key(agent, alias)
    subject = request.json().get("subject")
    if not isinstance(subject, str):
        raise HttpError(400, "missing_field", "field 'subject' (RFC 4514, e.g. \"CN=client-id,OU=org-id,O=Name,C=AE\") "
                                              "is required")
    signed = build_csr(agent.runtime.keys, alias, parse_subject(subject))
    agent.audit.record(KeyUse(request.peer.uid, request.peer.pid, agent.config.keys[alias].uri, "csr",
                              signed.scheme.jose_name, signed.request["certification_request_info"].dump(), "ok",
                              request.interaction_id))
    return Response.json(200, {"key": alias, "alg": signed.scheme.jose_name, "pem": signed.pem})
