"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Every way a request can go wrong maps to one status here, so no client error
surfaces as a 500 and no handler formats errors by hand.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",  # OpenAI reports a bad key as invalid_request_error/invalid_api_key
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}

# Pydantic loc entries that name a union member rather than a field.
_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _param_path(loc: tuple[Any, ...]) -> Optional[str]:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str):
            if "[" in part or part.lower() in _UNION_TAGS:
                continue
            path += f".{part}" if path else part
    return path or None


def from_validation_errors(errors: list[dict[str, Any]]) -> OpenAIError:
    """The first pydantic error as an OpenAI 400 (OpenAI reports one problem at a time)."""
    if not errors:
        return bad_request("Invalid request body")
    err = errors[0]
    kind = err.get("type", "")
    loc = tuple(err.get("loc", ()))
    if loc and loc[0] == "body":  # FastAPI prefixes body errors with "body"
        loc = loc[1:]
    param = _param_path(loc)
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind == "json_invalid":
        return bad_request(f"We could not parse the JSON body of your request ({msg}). "
                           "The API expects a JSON object as the request body.")
    if kind in ("model_type", "model_attributes_type", "dict_type") and param is None:
        return bad_request("The request body must be a JSON object.")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
    return bad_request(f"Invalid value for '{param}': {msg}.", param, code)


def from_validation_error(exc: ValidationError) -> OpenAIError:
    return from_validation_errors([dict(e) for e in exc.errors(include_url=False, include_context=False,
                                                               include_input=False)])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_errors(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        return OpenAIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(request: Request, _: ClientDisconnect) -> Response:
        # The client went away before its body arrived: not the server's error, and no one
        # reads the answer (uvicorn drops sends on a closed connection).
        logger.debug("client disconnected before sending its whole body: %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return OpenAIError(500, f"Internal server error: {type(exc).__name__}").response()
