"""/openapi.json describes the API as it behaves: the real request and response models, the 4xx
error objects, the real content types; and schemathesis, fuzzing every operation from it, finds
no 5xx and no response that breaks the schema."""
from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

from kvserve.metrics import PROMETHEUS_CONTENT_TYPE

# Bounded: fuzzing only (no exhaustive "coverage" phase), a few examples per operation, fixed
# seed (the same cases on every run), no example database left behind.  About 10 s on 2 cores.
FUZZ_CONFIG = SchemathesisConfig.from_dict({
    "seed": 12, "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    "generation": {"max-examples": 8, "database": "none"},
})
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def openapi(server) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    resp = httpx.get(server.base_url + "/openapi.json", timeout=30)
    assert resp.status_code == 200
    return resp.json()  # type: ignore[no-any-return]


def _body_refs(operation: dict[str, Any]) -> list[str]:
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    return [ref["$ref"].rsplit("/", 1)[1] for ref in schema.get("anyOf", [schema])]


def test_request_bodies_are_the_real_models(openapi: dict[str, Any]) -> None:
    paths = openapi["paths"]
    assert _body_refs(paths["/v1/completions"]["post"]) == ["CompletionRequest"]
    assert _body_refs(paths["/v1/chat/completions"]["post"]) == ["ChatCompletionRequest"]
    assert _body_refs(paths["/tokenize"]["post"]) == ["TokenizeCompletionRequest", "TokenizeChatRequest"]
    assert _body_refs(paths["/detokenize"]["post"]) == ["DetokenizeRequest"]
    schemas = openapi["components"]["schemas"]
    completion = schemas["CompletionRequest"]
    # `prompt`, or CacheBlend's `segments` in its place: one of the two is required.
    required = completion.get("required", []) + [f for alt in completion.get("anyOf", []) for f in alt["required"]]
    assert "prompt" in required and "segments" in required and completion["additionalProperties"] is False
    assert {"max_tokens", "temperature", "stop_token_ids", "stream_options"} <= set(completion["properties"])
    assert "messages" in schemas["ChatCompletionRequest"]["required"]


def test_responses_declare_models_errors_and_content_types(openapi: dict[str, Any]) -> None:
    paths = openapi["paths"]

    def content(path: str, method: str, status: str) -> dict[str, Any]:
        return paths[path][method]["responses"][status].get("content", {})  # type: ignore[no-any-return]

    ok = content("/v1/completions", "post", "200")
    assert ok["application/json"]["schema"]["$ref"].endswith("/CompletionResponse")
    assert "text/event-stream" in ok
    assert content("/v1/chat/completions", "post", "200")["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletionResponse")
    for path in ("/v1/completions", "/v1/chat/completions"):  # queue full, KV cache full, SLO unattainable
        assert {"404", "429", "503"} <= set(paths[path]["post"]["responses"]), path
    for path, item in paths.items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            assert "422" not in statuses, (path, method)  # validation errors are 400s here
            if "requestBody" in operation:
                assert {"400", "401", "408", "413"} <= statuses, (path, method)
            for status in statuses - {"200"}:
                assert content(path, method, status)["application/json"]["schema"]["$ref"].endswith(
                    "/ErrorResponse"), (path, method, status)
    assert set(content("/metrics", "get", "200")) == {PROMETHEUS_CONTENT_TYPE}
    assert content("/health", "get", "200") == {}  # an empty 200
    assert "503" in paths["/health"]["get"]["responses"]


@pytest.fixture(scope="module")
def api_schema(server):  # type: ignore[no-untyped-def]
    return schemathesis.openapi.from_url(server.base_url + "/openapi.json", config=FUZZ_CONFIG)


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
def test_fuzzed_requests_get_no_5xx_and_match_the_schema(case) -> None:  # type: ignore[no-untyped-def]
    case.call_and_validate(checks=CHECKS, timeout=120)
