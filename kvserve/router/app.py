"""The router's FastAPI app.

  POST /v1/completions, /v1/chat/completions   routed by the policy (or through a prefill/decode pair)
  GET  /v1/models, /v1/models/{id}, /version, POST /tokenize, /detokenize   any healthy instance
  GET  /health            200 while a request can be routed (a replica, or a prefill and a decode
                          instance), else 503 with an OpenAI error object
  GET  /metrics           the router's Prometheus metrics (metrics.py)
  GET  /router/instances  JSON: each instance's health, role, load and index size
  POST /router/kv_events  KV event batches from instances (kv_events.py)

Every error is an OpenAI error object (the server's own handlers, errors.py).
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvserve.entrypoints.openai.errors import OpenAIError, install_error_handlers
from kvserve.router.kv_events import KVEventError
from kvserve.router.metrics import CONTENT_TYPE
from kvserve.router.service import Router


def build_app(router: Router) -> FastAPI:
    app = FastAPI(title="kvserve router", lifespan=router.lifespan)
    app.state.router = router
    install_error_handlers(app)

    @app.post("/v1/completions", response_class=Response)
    async def completions(request: Request) -> Response:
        return await router.generate(request, "/v1/completions")

    @app.post("/v1/chat/completions", response_class=Response)
    async def chat_completions(request: Request) -> Response:
        return await router.generate(request, "/v1/chat/completions")

    for path, method in (("/v1/models", "GET"), ("/version", "GET"), ("/tokenize", "POST"),
                         ("/detokenize", "POST")):
        app.add_api_route(path, _passthrough(router, path), methods=[method], response_class=Response)

    @app.get("/v1/models/{model_id:path}", response_class=Response)
    async def get_model(request: Request, model_id: str) -> Response:
        return await router.passthrough(request, request.url.path)

    @app.get("/health", response_class=Response)
    async def health() -> Response:
        if router.healthy():
            return Response(status_code=200)
        what = "a prefill and a decode instance" if router.pd is not None else "an instance"
        return OpenAIError(503, f"The router has no healthy {what} to route to.", code="no_healthy_instance",
                           type="service_unavailable").response()

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/router/instances")
    async def instances() -> JSONResponse:
        return JSONResponse({"policy": router.config.policy, "block_size": router.config.block_size,
                             "instances": router.instances_status()})

    @app.post("/router/kv_events")
    async def kv_events(request: Request) -> JSONResponse:
        body = await router.read_body(request)
        try:
            result = router.ingest_kv_events(body)
        except KVEventError as exc:
            raise OpenAIError(400, str(exc), code="invalid_kv_events") from None
        return JSONResponse(result)

    return app


def _passthrough(router: Router, path: str) -> Any:
    async def handler(request: Request) -> Response:
        return await router.passthrough(request, path)
    handler.__name__ = "passthrough_" + path.strip("/").replace("/", "_")
    return handler
