"""The FastAPI app: routes and the small endpoints (models, health, tokenize, metrics).

`build_app(ctx)` wires a running `ServerContext` (engine already started) into
an app; serve_cli.py owns the process lifecycle around it.  The app is wrapped
in `RequestGuard` (guard.py): with an API key, every route except /health and
/metrics (probes and scrapers) needs `Authorization: Bearer <key>` -
/openapi.json, /docs, /redoc and /version included; request bodies are capped
in size and in read time.

Each route declares its request and response models and its error statuses,
so /openapi.json describes the API as it behaves (openapi.py).
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from kvserve.entrypoints.openai.chat import create_chat_completion
from kvserve.entrypoints.openai.completions import create_completion
from kvserve.entrypoints.openai.errors import OpenAIError, bad_request, install_error_handlers
from kvserve.entrypoints.openai.guard import RequestGuard
from kvserve.entrypoints.openai.kv_events import add_kv_event_route
from kvserve.entrypoints.openai.openapi import BODY_ERRORS, errors, install_openapi, request_body
from kvserve.entrypoints.openai.prompts import chat_prompt, require_tokenizer
from kvserve.entrypoints.openai.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, ErrorResponse, ModelCard, ModelList, TokenizeChatRequest, TokenizeCompletionRequest,
    TokenizeResponse, VersionResponse,
)
from kvserve.entrypoints.openai.serving import ServerContext, parse_body
from kvserve.metrics import PROMETHEUS_CONTENT_TYPE

_SSE = {"text/event-stream": {"schema": {"type": "string", "description": "Server-sent events when 'stream' is "
                                                                           "true, ending with 'data: [DONE]'"}}}
_REQUEST_MODELS: list[type[BaseModel]] = [CompletionRequest, ChatCompletionRequest, TokenizeCompletionRequest, TokenizeChatRequest,
                   DetokenizeRequest]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvserve")
    except PackageNotFoundError:
        return "unknown"


def _generation_docs(response: type[Any], request: type[Any]) -> dict[str, Any]:
    return {"responses": {200: {"model": response, "content": {"application/json": {}, **_SSE},
                                "description": "The completion (JSON), or its chunks as server-sent events "
                                               "when 'stream' is true"},
                          **errors(*BODY_ERRORS, 401, 404, 429)},
            "openapi_extra": request_body(request)}


def build_app(ctx: ServerContext) -> Any:
    """The ASGI app: FastAPI routes inside `RequestGuard`."""
    app = FastAPI(title="kvserve OpenAI-compatible API", version=_version())
    app.state.ctx = ctx
    install_error_handlers(app)
    _add_api_routes(app, ctx)
    _add_probe_routes(app, ctx)
    if ctx.kv_events is not None:
        add_kv_event_route(app, ctx.kv_events)
    install_openapi(app, _REQUEST_MODELS)
    return RequestGuard(app, api_key=ctx.api_key, max_request_bytes=ctx.max_request_bytes,
                        body_read_timeout_s=ctx.body_read_timeout_s, drain=ctx.drain)


def _add_api_routes(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/v1/completions", response_class=Response, **_generation_docs(CompletionResponse, CompletionRequest))
    async def completions(request: Request) -> Response:
        return await create_completion(ctx, request)

    @app.post("/v1/chat/completions", response_class=Response,
              **_generation_docs(ChatCompletionResponse, ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(ctx, request)

    @app.get("/v1/models", response_model=ModelList, responses=errors(401))
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[_model_card(ctx, name) for name in ctx.served_model_names]).model_dump())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors(401, 404))
    async def get_model(model_id: str) -> JSONResponse:
        return JSONResponse(_model_card(ctx, ctx.resolve_model(model_id)).model_dump())

    @app.post("/tokenize", response_model=TokenizeResponse, responses=errors(*BODY_ERRORS, 401, 404),
              openapi_extra=request_body(TokenizeCompletionRequest, TokenizeChatRequest))
    async def tokenize(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse((await ctx.tokenizers.run(len(body), lambda tok: _tokenize(ctx, tok, body))).model_dump())

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=errors(*BODY_ERRORS, 401, 404),
              openapi_extra=request_body(DetokenizeRequest))
    async def detokenize(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse((await ctx.tokenizers.run(len(body), lambda tok: _detokenize(ctx, tok, body))).model_dump())

    @app.get("/version", response_model=VersionResponse, responses=errors(401))
    async def version() -> JSONResponse:
        return JSONResponse(VersionResponse(version=_version()).model_dump())


def _add_probe_routes(app: FastAPI, ctx: ServerContext) -> None:
    @app.get("/health", response_class=Response,
             responses={200: {"description": "The engine is up (empty body)"},
                        503: {"model": ErrorResponse, "description": "The engine is dead or shutting down"}})
    async def health() -> Response:
        if ctx.engine.is_healthy() and not ctx.drain.expired:
            return Response(status_code=200)
        return OpenAIError(503, f"The engine is not available: {ctx.engine.dead_reason or 'shutting down'}.",
                           code="engine_unavailable").response()

    @app.get("/metrics", response_class=Response,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {PROMETHEUS_CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(ctx.metrics.render(ctx.engine.num_queued), media_type=PROMETHEUS_CONTENT_TYPE)


def _model_card(ctx: ServerContext, name: str) -> ModelCard:
    return ModelCard(id=name, root=ctx.info.model_dir, max_model_len=ctx.info.max_model_len)


def _tokenize(ctx: ServerContext, tok: Any, body: bytes) -> TokenizeResponse:
    """POST /tokenize on a tokenizer lane (`tok`: that lane's tokenizer)."""
    try:
        is_chat = "messages" in json.loads(body)
    except (ValueError, TypeError):
        is_chat = False  # let the schema report the problem
    if is_chat:
        chat = parse_body(TokenizeChatRequest, body)
        ctx.resolve_model(chat.model)
        tok = require_tokenizer(tok, "tokenization")
        tokens = chat_prompt(tok, chat.messages, add_generation_prompt=chat.add_generation_prompt,
                             continue_final_message=chat.continue_final_message,
                             chat_template_kwargs=chat.chat_template_kwargs,
                             add_special_tokens=chat.add_special_tokens).token_ids
        want_strs = chat.return_token_strs
    else:
        req = parse_body(TokenizeCompletionRequest, body)
        ctx.resolve_model(req.model)
        tok = require_tokenizer(tok, "tokenization")
        tokens = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        want_strs = req.return_token_strs
    return TokenizeResponse(count=len(tokens), max_model_len=ctx.info.max_model_len, tokens=tokens,
                            token_strs=tok.convert_ids_to_tokens(tokens) if want_strs else None)


def _detokenize(ctx: ServerContext, tok: Any, body: bytes) -> DetokenizeResponse:
    """POST /detokenize on a tokenizer lane."""
    req = parse_body(DetokenizeRequest, body)
    ctx.resolve_model(req.model)
    tok = require_tokenizer(tok, "detokenization")
    bad = [t for t in req.tokens if not 0 <= t < ctx.info.vocab_size]
    if bad:
        raise bad_request(f"Token ids must be in [0, {ctx.info.vocab_size}); got {bad[:5]}.", "tokens")
    return DetokenizeResponse(prompt=tok.decode(req.tokens))
