"""A tiny OpenAI-compatible completions server (FastAPI) for end-to-end bench tests.

Streaming `/v1/completions` emits `max_tokens` chunks, one token each, after a fixed "prefill"
delay, `token_delay_s` apart, then a usage chunk and `[DONE]` -- so the expected TTFT, ITL and
output counts are known.  Special `max_tokens` values trigger failures:
  13 -> HTTP 500 with an OpenAI error object
  7  -> an error event in the middle of the stream
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

FAIL_HTTP = 13
FAIL_MID_STREAM = 7


@dataclass
class FakeServerState:
    prefill_delay_s: float = 0.02
    token_delay_s: float = 0.005
    bodies: list[dict[str, Any]] = field(default_factory=list)


def make_app(state: FakeServerState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        state.bodies.append(body)
        n = int(body.get("max_tokens", 16))
        prompt = body.get("prompt")
        if n == FAIL_HTTP:
            return JSONResponse(
                status_code=500,
                content={"error": {"message": "injected failure", "type": "server_error", "code": 500}},
            )
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
            return JSONResponse(status_code=400, content={"error": {"message": "bad prompt", "type": "invalid_request_error"}})
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())

        async def stream() -> Any:
            await asyncio.sleep(state.prefill_delay_s)
            for i in range(n):
                if i:
                    await asyncio.sleep(state.token_delay_s)
                if n == FAIL_MID_STREAM and i == 2:
                    yield "data: " + json.dumps({"error": {"message": "injected stream error", "code": 500}}) + "\n\n"
                    return
                chunk = {
                    "id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": "fake-model",
                    "choices": [{"index": 0, "text": f" t{i}", "logprobs": None,
                                 "finish_reason": "length" if i == n - 1 else None}],
                }
                yield "data: " + json.dumps(chunk) + "\n\n"
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            yield "data: " + json.dumps({"id": "cmpl-fake", "object": "text_completion", "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


class FakeServer:
    """Runs the app with uvicorn in a daemon thread on 127.0.0.1 and an ephemeral port."""

    def __init__(self, state: FakeServerState | None = None) -> None:
        self.state = state or FakeServerState()
        config = uvicorn.Config(make_app(self.state), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
