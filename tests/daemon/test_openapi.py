"""docs/openapi.json: valid OpenAPI 3.1, equal to what the routes and specs make, naming every route and operation."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from agent.daemon import openapi
from agent.daemon.routes import ROUTES, Route
from agent.operations.inputs import Nothing
from agent.operations.registry import SPECS
from agent.operations.spec import Operation, Resource, Spec

DOCUMENT = Path(__file__).parents[2] / "docs" / "openapi.json"


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    return loaded


def test_every_operation_declares_its_result() -> None:
    missing = [spec.name for spec in SPECS if spec.result is None]
    assert not missing, (f"operations without a result type: {', '.join(missing)}. Add result=SomeAnswer to each "
                         "Spec (a TypedDict naming every member of the answer; agent/operations/results.py), then "
                         "run `make openapi`")


def test_the_committed_document_is_the_generated_one(committed: dict[str, Any]) -> None:
    # In a fresh interpreter, as `make openapi` runs it: nothing the test session imported changes it.
    made = subprocess.run([sys.executable, "-m", "agent.daemon.openapi"], capture_output=True, text=True,
                          check=True, timeout=120).stdout
    assert json.loads(made) == committed, "docs/openapi.json is stale: run `make openapi` and commit it"
    assert openapi.document() == committed, "the document depends on what the process imported"


def test_the_document_is_valid_openapi_3_1(committed: dict[str, Any]) -> None:
    validate(committed)  # openapi-spec-validator: the OpenAPI 3.1 schema, and every $ref resolves
    assert committed["openapi"] == "3.1.0"


def test_every_route_is_in_the_document_with_its_policy_operation(committed: dict[str, Any]) -> None:
    for route in ROUTES:
        described = committed["paths"].get(route.pattern, {}).get(route.method.lower())
        assert described is not None, f"{route.method} {route.pattern} is not in docs/openapi.json"
        assert described["operationId"] == route.spec.name
        assert described["x-tpp-operation"] == route.spec.operation.value
        assert described["x-tpp-access"] == route.spec.access.value
        assert "default" in described["responses"] and "200" in described["responses"]
    described = {(method.upper(), path) for path, item in committed["paths"].items() for method in item}
    assert described == {(route.method, route.pattern) for route in ROUTES}, "the document names a route no more"


def test_request_bodies_and_queries_follow_the_input_dataclasses(committed: dict[str, Any]) -> None:
    schemas = committed["components"]["schemas"]
    token = schemas["TokenInput"]
    assert token["required"] == ["scope"] and token["additionalProperties"] is False
    assert token["properties"]["scope"] == {"type": "string", "maxLength": 1024}
    assert token["properties"]["refresh"] == {"type": "boolean", "default": False}
    forward = schemas["ForwardInput"]["properties"]
    assert forward["headers"]["additionalProperties"] == {"type": "string"}
    assert forward["body_b64"]["contentEncoding"] == "base64" and forward["body_b64"]["type"] == ["string", "null"]
    query = committed["paths"]["/v1/keys/{alias}/public"]["get"]["parameters"]
    assert {"name": "format", "in": "query", "required": False,
            "schema": {"type": "string", "enum": ["pem", "jwk"], "default": "pem",
                       "description": "pem: SubjectPublicKeyInfo as PEM text; jwk: a jws key's JWK"}} in query
    public = committed["paths"]["/v1/keys/{alias}/public"]["get"]["responses"]["200"]["content"]
    assert set(public) == {"application/json", "application/x-pem-file"}


def test_errors_have_one_shape_and_list_their_codes(committed: dict[str, Any]) -> None:
    error = committed["components"]["schemas"]["Error"]
    assert error["required"] == ["code", "message", "interaction_id"]
    assert set(error["properties"]) == {"code", "message", "hint", "interaction_id", "bank_interaction_id"}
    responses = committed["components"]["responses"]
    assert "`unknown_field`" in responses["400"]["description"]
    assert "`forbidden`" in responses["403"]["description"] and "`key_purpose`" in responses["403"]["description"]
    assert "`registration_failed`" in responses["502"]["description"]
    assert "Retry-After" in responses["503"]["headers"]
    sign = committed["paths"]["/v1/keys/{alias}/sign"]["post"]
    assert sign["x-tpp-key-purposes"] == ["jws"] and "raw_sign = true" in sign["description"]
    assert "403" not in committed["paths"]["/v1/health"]["get"]["responses"]  # open to anyone


def test_bank_answers_name_their_interaction_ids(committed: dict[str, Any]) -> None:
    for route in ROUTES:
        if route.spec.calls_bank:
            ref = route_answer(committed, route)
            assert {"interaction_id", "bank_interaction_id"} <= set(ref["properties"]), route.spec.name
            assert "interaction_id" in ref["required"]


def route_answer(document: dict[str, Any], route: Route) -> dict[str, Any]:
    schema = document["paths"][route.pattern][route.method.lower()]["responses"]["200"]["content"][
        "application/json"]["schema"]
    found: dict[str, Any] = document["components"]["schemas"][schema["$ref"].rpartition("/")[2]]
    return found


def test_an_operation_without_a_result_type_says_what_to_add() -> None:
    spec = Spec("newop", Operation.HEALTH, "a new operation", Resource.NONE, Nothing, lambda context, given: {})
    with pytest.raises(openapi.MissingResultError, match=r"operation 'newop' has no result type: add result="
                                                         r"SomeAnswer to its Spec in tests/daemon/test_openapi\.py"):
        openapi.document_of((Route("GET", "/v1/newop", spec),))


def test_a_result_type_the_schema_cannot_say_is_named() -> None:
    @dataclasses.dataclass
    class Odd:
        when: complex

    spec = Spec("odd", Operation.HEALTH, "odd", Resource.NONE, Nothing, lambda context, given: {}, result=Odd)
    with pytest.raises(TypeError, match="no JSON Schema for <class 'complex'>"):
        openapi.document_of((Route("GET", "/v1/odd", spec),))


def test_the_generator_names_a_missing_result_type_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    spec = Spec("newop", Operation.HEALTH, "a new operation", Resource.NONE, Nothing, lambda context, given: {})
    monkeypatch.setattr(openapi, "ROUTES", (Route("GET", "/v1/newop", spec),))
    assert openapi.main() == 1
    out, err = capsys.readouterr()
    assert out == ""  # `make openapi` keeps the committed document
    assert err.count("\n") == 1 and err.startswith("error: operation 'newop' has no result type: add result="), err
