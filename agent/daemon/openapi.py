"""The socket API's OpenAPI 3.1 document, made from the routes and the operations' specs: ``make openapi``.

    python -m agent.daemon.openapi > docs/openapi.json

Everything in it comes from what the agent runs by: paths and methods from :data:`agent.daemon.routes.ROUTES`,
request bodies and query parameters from each Spec's ``input`` dataclass (through the parser's own plan,
:func:`agent.operations.inputs.json_schema`), answers from its ``result`` type (agent/operations/results.py), the
policy operation, access and key purposes from the Spec (``x-tpp-operation``, ``x-tpp-access``,
``x-tpp-resource``, ``x-tpp-key-purposes``), and the error codes of each status from the code that raises them.
tests/daemon/test_openapi.py keeps docs/openapi.json equal to this module's output.
"""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import agent
from agent.config import KeyPurpose
from agent.daemon.http import INTERACTION_HEADER
from agent.daemon.routes import ROUTES, Route
from agent.daemon.routing import http_error
from agent.errors import AgentError
from agent.operations import inputs, results
from agent.operations.inputs import InvalidInput
from agent.operations.spec import Access, Resource, Spec
from pkcs11_backends.errors import Pkcs11Error

_PACKAGE = Path(agent.__file__).parent
_REF = "#/components/"
_RETRY_AFTER = {"$ref": _REF + "headers/Retry-After"}
# The statuses every route may answer, and those that depend on what the route does: described once each.
_ERRORS = {
    400: "The request is malformed, or its input is refused (unknown field, wrong type, too long...).",
    403: "The policy refuses this caller this operation (deny by default), or the key's purpose does.",
    404: "No such key or bank is configured, or no key on the token.",
    405: "The path exists, not with this method (Allow names those it takes).",
    409: "The request conflicts with the state: a key label on the token twice, a registration whose last "
         "attempt's outcome is unknown.",
    413: "The request body is larger than [daemon] max_request_bytes.",
    415: "The request body is not application/json.",
    500: "The agent failed inside, or its audit trail cannot take the record (nothing was signed).",
    502: "The bank (or the PKCS#11 module) refused or answered outside the protocol.",
    503: "Not ready, the token is unavailable, or the bank or the agent is busy: retry after Retry-After.",
    504: "The bank did not answer in time; a non-idempotent request's outcome is unknown.",
}
_TEXT = {"application/x-pem-file": {"type": "string", "pattern": "^-----BEGIN [A-Z ]+-----\n"}}
_PURPOSE = {"alias": "a configured key: [keys.ALIAS] (or a name that is exactly one token label)",
            "bank": "a configured bank: [banks.NAME]"}


def document() -> dict[str, Any]:
    return document_of(ROUTES)


def document_of(routes: Sequence[Route]) -> dict[str, Any]:
    components = results.Components()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.pattern, {})[route.method.lower()] = _operation(route, components)
    codes = error_codes()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tpp-agent socket API",
            "version": agent.__version__,
            "summary": "The HSM-backed keys, JWS and bank calls of a TPP, served to local services.",
            "description": _DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://localhost", "description": "the Unix socket [daemon] socket names "
                                                              "(curl --unix-socket PATH http://localhost/v1/health)"}],
        "tags": [{"name": "agent", "description": "liveness and readiness"},
                 {"name": "keys", "description": "the configured keys: public halves, signatures, CSRs"},
                 {"name": "banks", "description": "calls to a configured bank over mTLS with the transport key"}],
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR_SCHEMA, **components.schemas},
            "parameters": {
                "x-fapi-interaction-id": {
                    "name": INTERACTION_HEADER, "in": "header", "required": False,
                    "description": "The caller's id for this request (a UUID). It is the id sent to the bank, "
                                   "answered and audited; without it the agent makes one.",
                    "schema": {"type": "string", "format": "uuid"}},
                **{name: {"name": name, "in": "path", "required": True, "description": text,
                          "schema": {"type": "string", "minLength": 1}} for name, text in _PURPOSE.items()},
            },
            "headers": {
                INTERACTION_HEADER: {"description": "The id of this request (the caller's, else the agent's).",
                                     "required": True, "schema": {"type": "string", "format": "uuid"}},
                "Retry-After": {"description": "seconds", "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                "Allow": {"description": "the methods the path takes", "schema": {"type": "string"}},
            },
            "responses": {str(status): _error_response(status, text, codes.get(status, ()))
                          for status, text in _ERRORS.items()}
                         | {"Error": _error_response(None, "Any other error, in the same shape" + "".join(
                             f"; {status}: " + ", ".join(f"`{code}`" for code in found)
                             for status, found in codes.items() if status not in _ERRORS) + ".", ())},
        },
    }


def _operation(route: Route, components: results.Components) -> dict[str, Any]:
    spec = route.spec
    if spec.result is None:
        raise MissingResultError(spec)
    answer = results.schema(spec.result, components)
    if spec.calls_bank:
        _with_interaction(answer, components)
    operation: dict[str, Any] = {
        "operationId": spec.name,
        "summary": spec.summary,
        "description": _policy(spec),
        "tags": ["agent" if spec.resource is Resource.NONE else "banks" if spec.resource is Resource.BANK
                 else "keys"],
        "x-tpp-operation": spec.operation.value,
        "x-tpp-access": spec.access.value,
        "x-tpp-resource": spec.resource.value,
        "parameters": [{"$ref": _REF + f"parameters/{name}"} for name in ("alias", "bank")
                       if "{" + name + "}" in route.pattern] + [{"$ref": _REF + "parameters/x-fapi-interaction-id"}],
    }
    if spec.purposes and spec.resource in (Resource.KEY, Resource.KEYS):
        operation["x-tpp-key-purposes"] = sorted(p.value for p in spec.purposes)
    input_schema = inputs.json_schema(spec.input)
    if route.from_query:
        required = set(input_schema.get("required", ()))
        operation["parameters"] += [
            {"name": name, "in": "query", "required": name in required, "schema": schema}
            for name, schema in input_schema["properties"].items()]
    else:
        name = spec.input.__name__
        components.schemas.setdefault(name, input_schema)
        operation["requestBody"] = {"required": bool(input_schema.get("required")),
                                    "content": {"application/json": {"schema": {"$ref": _REF + f"schemas/{name}"}}}}
    # JSON answers are the result type's; a route that renders text (PEM, a metrics page) answers a string.
    content = {media: {"schema": answer if media == "application/json" else _TEXT.get(media, {"type": "string"})}
               for media in route.media_types}
    operation["responses"] = {
        "200": {"description": spec.summary, "headers": {INTERACTION_HEADER: {"$ref": _REF + f"headers/"
                                                                                          f"{INTERACTION_HEADER}"}},
                "content": content},
        **{str(status): {"$ref": _REF + f"responses/{status}"} for status in _statuses(route)},
        "default": {"$ref": _REF + "responses/Error"},
    }
    return operation


def _statuses(route: Route) -> Iterator[int]:
    """The error statuses a route may answer besides any route's (the document's ``default`` covers those)."""
    spec = route.spec
    yield 400
    if spec.access is not Access.OPEN:
        yield 403
    if spec.resource in (Resource.KEY, Resource.BANK):
        yield 404
        yield 409
    if route.method != "GET":
        yield 413
        yield 415
    yield 500
    if spec.calls_bank or spec.resource is not Resource.NONE:
        yield 502
    yield 503
    if spec.calls_bank:
        yield 504


def _with_interaction(answer: dict[str, Any], components: results.Components) -> None:
    """Every bank operation's answer names its interaction ids (agent/operations/core.py adds them)."""
    name = answer.get("$ref", "").rpartition("/")[2]
    target = components.schemas.get(name)
    if target is None or target.get("type") != "object":
        return
    target["properties"].setdefault("interaction_id", {"type": "string", "format": "uuid"})
    target["properties"].setdefault("bank_interaction_id", {"type": "string"})
    if "interaction_id" not in target.setdefault("required", []):
        target["required"].append("interaction_id")


def _policy(spec: Spec[Any]) -> str:
    grant = f"`{spec.operation.value}`"
    on = {Resource.KEY: " for the key", Resource.BANK: " for the bank",
          Resource.KEYS: " (the answer holds the keys it grants)", Resource.NONE: ""}[spec.resource]
    who = {Access.OPEN: "Open to anyone who can reach the socket.",
           Access.RULE: f"Policy: a [policy.rules.*] entry granting {grant}{on}, or an admin.",
           Access.ADMIN: f"Policy: admins only ({grant}{on})."}[spec.access]
    if spec.purposes and spec.purposes != frozenset(KeyPurpose) and spec.resource in (Resource.KEY, Resource.KEYS):
        who += " Keys of purpose " + ", ".join(sorted(p.value for p in spec.purposes)) + " only"
        who += " that declare raw_sign = true." if spec.raw_sign else "."
    if spec.calls_bank:
        who += (" Calls the bank: every request carries this request's x-fapi-interaction-id, and the answer "
                "names it (and the bank's, when it answered with another).")
    return who


def _error_response(status: int | None, text: str, codes: tuple[str, ...]) -> dict[str, Any]:
    described = text + (" Codes: " + ", ".join(f"`{code}`" for code in codes) + "." if codes else "")
    headers: dict[str, Any] = {INTERACTION_HEADER: {"$ref": _REF + f"headers/{INTERACTION_HEADER}"}}
    if status == 503:
        headers["Retry-After"] = _RETRY_AFTER
    if status == 405:
        headers["Allow"] = {"$ref": _REF + "headers/Allow"}
    return {"description": described, "headers": headers,
            "content": {"application/json": {"schema": {"$ref": _REF + "schemas/Error"}}}}


def error_codes() -> dict[int, tuple[str, ...]]:
    """The codes each status may carry: those the daemon raises by name, and those of every error class the
    router classifies (:func:`agent.daemon.routing.http_error`), found in the code rather than listed twice."""
    found: dict[int, set[str]] = {}
    for status, code in _raised_codes():
        found.setdefault(status, set()).add(code)
    for cls in _subclasses(AgentError, Pkcs11Error):
        if issubclass(cls, InvalidInput):
            continue  # its code is its instance's: found by _raised_codes
        # An instance made without __init__: http_error classifies by class (and reads str() and hint only).
        try:
            error = http_error(cls.__new__(cls))
        except AttributeError:  # its __str__ needs what __init__ sets; its base classes' codes are found
            continue
        if error.code != "internal_error":
            found.setdefault(error.status, set()).add(error.code)
    return {status: tuple(sorted(codes)) for status, codes in sorted(found.items())}


def _raised_codes() -> Iterator[tuple[int, str]]:
    """``HttpError(STATUS, "code", ...)`` in the daemon and ``InvalidInput("code", ...)`` anywhere (400)."""
    for path in sorted(_PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            constants = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if node.func.id == "HttpError" and len(constants) >= 2 and isinstance(constants[0], int) \
                    and isinstance(constants[1], str):
                yield constants[0], constants[1]
            elif node.func.id == "InvalidInput" and constants and isinstance(constants[0], str) \
                    and isinstance(node.args[0], ast.Constant):
                yield 400, constants[0]


def _subclasses(*roots: type[AgentError | Pkcs11Error]) -> Iterator[type[AgentError | Pkcs11Error]]:
    seen: set[type[AgentError | Pkcs11Error]] = set()
    stack = list(roots)
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                yield sub


class MissingResultError(Exception):
    def __init__(self, spec: Spec[Any]) -> None:
        module = sys.modules[spec.run.__module__].__file__ or spec.run.__module__
        root = str(_PACKAGE.parent) + "/"
        super().__init__(
            f"operation {spec.name!r} has no result type: add result=SomeAnswer to its Spec in "
            f"{module.removeprefix(root)}, "
            "SomeAnswer a TypedDict (or dataclass) naming every member of its answer (agent/operations/results.py), "
            "then run `make openapi`")


_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every error answer, whatever its status: clients branch on code, people read message and hint.",
    "properties": {
        "code": {"type": "string", "pattern": "^[a-z0-9_]+$",
                 "description": "stable: each status's response lists the codes it carries"},
        "message": {"type": "string", "description": "what went wrong, on one line"},
        "hint": {"type": "string", "description": "what to do about it (left out when there is nothing to add)"},
        "interaction_id": {"type": "string", "format": "uuid",
                           "description": "this request's x-fapi-interaction-id: the caller's, else the agent's; "
                                          "the one sent to the bank, logged and audited"},
        "bank_interaction_id": {"type": "string",
                                "description": "the x-fapi-interaction-id the bank answered with, when it is not "
                                               "interaction_id"},
    },
    "required": ["code", "message", "interaction_id"],
    "additionalProperties": False,
}

_DESCRIPTION = """\
HTTP/1.1 on the Unix socket named by `[daemon] socket` (mode 0660, group `[daemon] socket_group`). The \
agent knows each caller by its socket peer credentials (uid, pid): `[policy.rules.*]` entries grant \
operations (each route's `x-tpp-operation`) on keys and banks, deny by default; `health` and `ready` \
are open. Request and answer bodies are JSON; unknown fields are refused by name.

Interaction ids: send `x-fapi-interaction-id` (a UUID) and it is this request's id; leave it out and the \
agent makes one. That one id is answered in the `x-fapi-interaction-id` header, in every error's \
`interaction_id`, in each bank operation's answer, in the request log line and in every audit record the \
request writes, and it is the `x-fapi-interaction-id` of every request the operation sends to the bank \
(discovery, registration, token, PAR, forward). A bank that answers with another id has it reported as \
`bank_interaction_id`, beside ours. See docs/api.md.

Errors: `{"code", "message", "hint", "interaction_id"}` with the HTTP status; `code` is stable."""


def main() -> int:
    try:
        made = document()
    except (MissingResultError, results.ResultTypeError) as exc:  # the developer's to fix: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    json.dump(made, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
