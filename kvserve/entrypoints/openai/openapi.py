"""The server's OpenAPI document, built from the pydantic models the handlers really use.

Handlers read and validate their bodies themselves (`parse_body`: strict
parsing, OpenAI-style errors, the API key checked before the body is read),
so FastAPI cannot infer request bodies from their signatures.  Each route
instead names its request model in `request_body(...)`; `install_openapi`
adds the request models' JSON schemas to the document's components, and drops
FastAPI's 422 responses (validation errors are 400s here, see errors.py).
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from kvserve.entrypoints.openai.protocol import ErrorResponse

_REF = "#/components/schemas/{model}"

_ERRORS = {
    400: "Invalid request: the error object's 'param' names the field.",
    401: "Missing or wrong API key (only when the server was started with one).",
    404: "No such model.",
    408: "The request body did not arrive within the body read timeout.",
    413: "The request body is larger than the server's limit.",
    429: "The server is at capacity (queue full, KV cache full, or an SLO it cannot meet); see Retry-After.",
    503: "The engine is unavailable, or the server is shutting down.",
}
BODY_ERRORS = (400, 408, 413, 503)  # what any route that reads a body can answer


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses (each an OpenAI error object)."""
    return {code: {"model": ErrorResponse, "description": _ERRORS[code]} for code in sorted(set(codes))}


def request_body(*models: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra=` for a route whose JSON body is one of `models`."""
    refs = [{"$ref": _REF.format(model=m.__name__)} for m in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def build_openapi(app: FastAPI, request_models: list[type[BaseModel]]) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _, defs = models_json_schema([(m, "validation") for m in request_models], ref_template=_REF)
    for name, definition in defs.get("$defs", {}).items():
        if name in components and components[name] != definition:
            raise RuntimeError(f"OpenAPI schema name clash: {name}")
        components[name] = definition
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def install_openapi(app: FastAPI, request_models: list[type[BaseModel]]) -> None:
    """Serve `build_openapi(app, request_models)` (built once) at /openapi.json."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, request_models)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
