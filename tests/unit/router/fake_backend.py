"""A small OpenAI-compatible backend for router tests, and a uvicorn-in-a-thread runner.

The backend records every request it gets, answers /v1/completions and /v1/chat/completions
(streamed or not) with text naming itself, exports /metrics with the names kvserve exports (and,
when it has a role, `kvserve:instance_info{role=...}`), and can be told to fail:
  health_status   /health answers this (200 healthy)
  fail_status     generation answers this status with an OpenAI error object
  cut_after       a stream is cut (the connection dropped) after this many chunks
A backend with role "prefill" answers with `kv_transfer_params`; one with role "decode" echoes
the `kv_transfer_params` it received in its answer.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


@dataclass
class BackendState:
    name: str
    role: Optional[str] = None
    health_status: int = 200
    fail_status: Optional[int] = None
    cut_after: Optional[int] = None
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    chunk_delay_s: float = 0.0
    first_delay_s: float = 0.0  # before the first chunk (a slow prefill)
    streams_abandoned: int = 0  # streams whose reader went away before the end
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    give_transfer_params: bool = True

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]


def _chunks(state: BackendState, body: dict[str, Any], chat: bool) -> list[dict[str, Any]]:
    n = int(body.get("max_tokens") or 3)
    out = []
    for i in range(n):
        piece = f" {state.name}-{i}"
        choice: dict[str, Any] = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                                  else {"index": 0, "text": piece, "finish_reason": None})
        if i == n - 1:
            choice["finish_reason"] = "length"
        out.append({"id": f"x-{state.name}", "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": 1, "model": "fake", "choices": [choice]})
    return out


def make_app(state: BackendState) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=state.health_status)

    @app.get("/metrics")
    async def metrics() -> Response:
        lines = [f'vllm:num_requests_running{{model_name="fake"}} {state.running}',
                 f'vllm:num_requests_waiting{{model_name="fake"}} {state.waiting}',
                 f'vllm:kv_cache_usage_perc{{model_name="fake"}} {state.kv_usage}']
        if state.role:
            lines.append(f'kvserve:instance_info{{role="{state.role}",block_size="16"}} 1.0')
        return Response("\n".join(lines) + "\n", media_type="text/plain")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        state.requests.append(("/v1/models", {}))
        return {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": state.name}]}

    async def generate(request: Request, chat: bool) -> Response:
        body = await request.json()
        state.requests.append((request.url.path, body))
        if state.fail_status is not None:
            return JSONResponse({"error": {"message": f"{state.name} failed", "type": "server_error",
                                           "param": None, "code": "injected"}}, status_code=state.fail_status)
        chunks = _chunks(state, body, chat)
        if not body.get("stream"):
            text = "".join(c["choices"][0]["delta"]["content"] if chat else c["choices"][0]["text"] for c in chunks)
            choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "length"} if chat
                                      else {"index": 0, "text": text, "finish_reason": "length"})
            answer: dict[str, Any] = {"id": f"x-{state.name}", "object": "chat.completion" if chat else "text_completion",
                                      "created": 1, "model": "fake", "choices": [choice],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": len(chunks),
                                                "total_tokens": 1 + len(chunks)}}
            if state.role == "prefill" and state.give_transfer_params:
                answer["kv_transfer_params"] = {"remote_engine": state.name, "blocks": [1, 2]}
            if state.role == "decode":
                answer["received_kv_transfer_params"] = body.get("kv_transfer_params")
            return JSONResponse(answer)

        async def events() -> Any:
            finished = False
            try:
                if state.first_delay_s:
                    await asyncio.sleep(state.first_delay_s)
                for i, c in enumerate(chunks):
                    if state.cut_after is not None and i == state.cut_after:
                        raise RuntimeError("injected connection drop")
                    if state.chunk_delay_s:
                        await asyncio.sleep(state.chunk_delay_s)
                    yield ("data: " + json.dumps(c) + "\n\n").encode()
                yield b"data: [DONE]\n\n"
                finished = True
            finally:
                if not finished and state.cut_after is None:
                    state.streams_abandoned += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """An ASGI app served by uvicorn in a daemon thread on 127.0.0.1; stop() frees the port and
    start() binds the same port again (a restarted instance)."""

    def __init__(self, app: Any, port: Optional[int] = None, lifespan: str = "off") -> None:
        self.app = app
        self.port = port or free_port()
        self.lifespan = lifespan  # "on" for apps with startup work (the router)
        self._server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> "ThreadServer":
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, lifespan=self.lifespan)
        self._server = uvicorn.Server(config)  # in a thread, uvicorn installs no signal handlers
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self, force: bool = True) -> None:
        """force: drop open connections at once (a killed instance) instead of draining them."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._server.force_exit = force
            self._thread.join(timeout=20)
            self._server = None

    def __enter__(self) -> "ThreadServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
