"""Health, readiness and key endpoints (``/v1/health``, ``/v1/ready``, ``/v1/keys/...``, ``/v1/jwks``)."""

from __future__ import annotations

import base64
import os

from asn1crypto import pem

from agent import jose
from agent.daemon.app import Agent
from agent.daemon.audited import on_behalf_of
from agent.daemon.http import HttpError, Request, Response, base64_field
from agent.daemon.routing import route
from agent.jose.encoding import compact_json
from agent.x509.csr import build_csr
from agent.x509.signatures import CsrAlgorithm
from agent.x509.subject import parse_subject
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
                       "kid": key.kid, "certificate": info.certificate.as_dict() if info.certificate else None,
                       "label": info.label, "id": info.id.hex(), "token_uri": str(info.uri)})
    return Response.json(200, {"keys": result})


@route("GET", "/v1/keys/{alias}/public")
def public_key(agent: Agent, request: Request, params: dict[str, str]) -> Response:
    """PEM SubjectPublicKeyInfo, or with ``?format=jwk`` the JWK (``kid``, ``alg``, ``x5c``…)."""
    alias = params["alias"]
    request.log.update(operation="public", key=alias)
    agent.policy.check(request.peer, "public", key=alias)
    _known_key(agent, alias)
    form = request.query.get("format", "pem")
    if form == "jwk":
        return Response.json(200, jose.to_jwk(jose.resolve(agent.runtime.keys, agent.config, alias)))
    if form != "pem":
        raise HttpError(400, "bad_query", f"format must be pem or jwk, not {form[:20]!r}")
    spki = agent.runtime.keys.public_key_info(alias)
    return Response(200, pem.armor("PUBLIC KEY", spki.dump()), content_type="application/x-pem-file")


@route("GET", "/v1/jwks")
def jwks(agent: Agent, request: Request, _: dict[str, str]) -> Response:
    """The JWK Set of the configured keys whose public half the peer may read."""
    request.log["operation"] = "public"
    visible = agent.policy.permitted(request.peer, "public", agent.config.keys)
    if not visible:
        agent.policy.check(request.peer, "public", "*")
        return Response.json(200, {"keys": []})
    return Response.json(200, jose.jwks(agent.runtime.keys, agent.config, visible))


@route("POST", "/v1/keys/{alias}/jws")
def jws(agent: Agent, request: Request, params: dict[str, str]) -> Response:
    """A compact JWS over the caller's payload: ``payload_b64`` (exact bytes) or ``payload`` (a JSON object)."""
    alias = params["alias"]
    request.log.update(operation="jws", key=alias)
    agent.policy.check(request.peer, "jws", key=alias)
    _known_key(agent, alias)
    body = request.json()
    if ("payload" in body) == ("payload_b64" in body):
        raise HttpError(400, "missing_field", "give exactly one of 'payload_b64' (bytes) or 'payload' (JSON object)")
    if "payload" in body:
        if not isinstance(body["payload"], dict):
            raise HttpError(400, "bad_field", "field 'payload' must be a JSON object (or send 'payload_b64')")
        payload = compact_json(body["payload"])
    else:
        payload = base64_field(body, "payload_b64")
    alg, header = body.get("alg"), body.get("header")
    if alg is not None and not isinstance(alg, str):
        raise HttpError(400, "bad_field", "field 'alg' must be PS256, ES256, ES384 or RS256")
    if header is not None and not isinstance(header, dict):
        raise HttpError(400, "bad_field", "field 'header' must be a JSON object of extra protected header members")
    key = jose.resolve(agent.runtime.keys, agent.config, alias)
    request.log["alg"] = alg or key.algorithms[0]
    with on_behalf_of(request, "jws"):
        signed = jose.sign_jws(agent.signer, agent.config, key, payload, alg=alg, header=header)
    return Response.json(200, {"key": alias, "kid": key.kid, "alg": alg or key.algorithms[0], "jws": signed})


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
    with on_behalf_of(request, "sign"):  # the signature leaves only once its audit record is on disk
        signature = agent.signer.sign(alias, data, SignatureScheme.from_jose(alg))
    return Response.json(200, {"key": alias, "kid": key.kid, "alg": alg,
                               "signature_b64": base64.b64encode(signature).decode("ascii")})


@route("POST", "/v1/keys/{alias}/csr")
def csr(agent: Agent, request: Request, params: dict[str, str]) -> Response:
    """A PKCS#10 request for the key, signed on the token (admins only)."""
    alias = params["alias"]
    request.log.update(operation="csr", key=alias)
    agent.policy.check(request.peer, "csr", key=alias)
    _known_key(agent, alias)
    body = request.json()
    subject, alg = body.get("subject"), body.get("alg")
    if not isinstance(subject, str):
        raise HttpError(400, "missing_field", "field 'subject' (RFC 4514, e.g. \"CN=client-id,OU=org-id,O=Name,C=AE\") "
                                              "is required")
    if alg is not None and not isinstance(alg, str):
        raise HttpError(400, "bad_field", f"field 'alg' must be one of {', '.join(a.value for a in CsrAlgorithm)}")
    with on_behalf_of(request, "csr"):
        signed = build_csr(agent.signer, alias, parse_subject(subject), CsrAlgorithm.parse(alg) if alg else None)
    return Response.json(200, {"key": alias, "alg": signed.scheme.jose_name, "pem": signed.pem})
