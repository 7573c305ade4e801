"""The FastAPI app: routes, API-key check, and the small endpoints (models, health, tokenize, metrics).

`build_app(ctx)` wires a running `ServerContext` (engine already started) into
an app; serve_cli.py owns the process lifecycle around it.

With an API key, every route except /health and /metrics (probes and
scrapers) needs `Authorization: Bearer <key>`.
"""
from __future__ import annotations

import hmac
import json
from typing import Any, Callable, Coroutine

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvserve.entrypoints.openai.chat import create_chat_completion
from kvserve.entrypoints.openai.completions import create_completion
from kvserve.entrypoints.openai.errors import OpenAIError, bad_request, install_error_handlers
from kvserve.entrypoints.openai.prompts import chat_prompt, require_tokenizer
from kvserve.entrypoints.openai.protocol import (
    DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeChatRequest, TokenizeCompletionRequest,
    TokenizeResponse,
)
from kvserve.entrypoints.openai.serving import ServerContext, parse_body
from kvserve.metrics import PROMETHEUS_CONTENT_TYPE


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvserve")
    except PackageNotFoundError:
        return "unknown"


def api_key_dependency(expected: str) -> Callable[[Request], Coroutine[Any, Any, None]]:
    expected_bytes = expected.encode()

    async def check(request: Request) -> None:
        header = request.headers.get("authorization")
        if not header:
            raise OpenAIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected_bytes):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})

    return check


def build_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="kvserve OpenAI-compatible API", version=_version())
    app.state.ctx = ctx
    install_error_handlers(app)
    api = APIRouter(dependencies=[Depends(api_key_dependency(ctx.api_key))] if ctx.api_key else [])

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(ctx, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(ctx, request)

    @api.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[_model_card(ctx, name) for name in ctx.served_model_names]).model_dump())

    @api.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        return JSONResponse(_model_card(ctx, ctx.resolve_model(model_id)).model_dump())

    @api.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse((await ctx.run_tokenizer(_tokenize, ctx, body)).model_dump())

    @api.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req = parse_body(DetokenizeRequest, await request.body())
        ctx.resolve_model(req.model)
        tok = require_tokenizer(ctx.tokenizer, "detokenization")
        bad = [t for t in req.tokens if not 0 <= t < ctx.info.vocab_size]
        if bad:
            raise bad_request(f"Token ids must be in [0, {ctx.info.vocab_size}); got {bad[:5]}.", "tokens")
        return JSONResponse(DetokenizeResponse(prompt=tok.decode(req.tokens)).model_dump())

    app.include_router(api)

    @app.get("/health")
    async def health() -> Response:
        if ctx.engine.is_healthy():
            return Response(status_code=200)
        return OpenAIError(503, f"The engine is not available: {ctx.engine.dead_reason or 'shutting down'}.",
                           code="engine_unavailable").response()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(ctx.engine.num_queued), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": _version()})

    return app


def _model_card(ctx: ServerContext, name: str) -> ModelCard:
    return ModelCard(id=name, root=ctx.info.model_dir, max_model_len=ctx.info.max_model_len)


def _tokenize(ctx: ServerContext, body: bytes) -> TokenizeResponse:
    try:
        is_chat = "messages" in json.loads(body)
    except (ValueError, TypeError):
        is_chat = False  # let the schema report the problem
    tok = require_tokenizer(ctx.tokenizer, "tokenization")
    if is_chat:
        chat = parse_body(TokenizeChatRequest, body)
        ctx.resolve_model(chat.model)
        tokens = chat_prompt(tok, chat.messages, add_generation_prompt=chat.add_generation_prompt,
                             continue_final_message=chat.continue_final_message,
                             chat_template_kwargs=chat.chat_template_kwargs,
                             add_special_tokens=chat.add_special_tokens).token_ids
        want_strs = chat.return_token_strs
    else:
        req = parse_body(TokenizeCompletionRequest, body)
        ctx.resolve_model(req.model)
        tokens = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        want_strs = req.return_token_strs
    return TokenizeResponse(count=len(tokens), max_model_len=ctx.info.max_model_len, tokens=tokens,
                            token_strs=tok.convert_ids_to_tokens(tokens) if want_strs else None)
