"""SSE parsing of the streaming client, with canned responses (httpx.MockTransport)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from kvserve.bench.client import RequestResult, _stream_one, build_body, normalize_base_url
from kvserve.bench.datasets import BenchRequest
from kvserve.bench.errors import BenchInputError


def _sse(*events: Any) -> bytes:
    out = []
    for e in events:
        if isinstance(e, str) and e.startswith(":"):  # an SSE comment line, not data
            out.append(e + "\n\n")
        else:
            out.append("data: " + (e if isinstance(e, str) else json.dumps(e)) + "\n\n")
    return "".join(out).encode()


def _chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def _run(content: bytes, status: int = 200) -> RequestResult:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers={"content-type": "text/event-stream"})

    async def go() -> RequestResult:
        res = RequestResult(0, 3, 4, 0.0)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await _stream_one(client, "http://x/v1/completions", {"prompt": [1, 2, 3]}, res, 0.0)
        return res

    return asyncio.run(go())


def test_counts_tokens_and_reads_usage() -> None:
    res = _run(_sse(_chunk("a"), ": keep-alive", _chunk(""), _chunk("b"), _chunk("", "length"),
                    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, "[DONE]"))
    assert res.success and res.error == ""
    # "a", "" (held back, finish_reason null) and "b" are token events; the empty closing chunk is not
    assert res.token_events == 3 and len(res.itl_s) == 2
    assert res.output_tokens == 4 and res.usage_prompt_tokens == 3  # usage wins over event count
    assert res.ttft_s is not None and res.e2el_s is not None and res.e2el_s >= res.ttft_s


def test_without_usage_counts_events() -> None:
    res = _run(_sse(_chunk("a"), _chunk("b"), _chunk("c", "length"), "[DONE]"))
    assert res.success and res.output_tokens == 3 and res.usage_completion_tokens is None


def test_http_error_keeps_message() -> None:
    res = _run(json.dumps({"error": {"message": "model not found", "type": "x"}}).encode(), status=404)
    assert not res.success and res.error == "HTTP 404: model not found"


def test_stream_error_event() -> None:
    res = _run(_sse(_chunk("a"), {"error": {"message": "oom"}}))
    assert not res.success and res.error == "stream error: oom"


def test_malformed_sse() -> None:
    res = _run(_sse(_chunk("a"), "{not json"))
    assert not res.success and "malformed SSE data" in res.error


def test_empty_stream_is_a_failure() -> None:
    res = _run(_sse("[DONE]"))
    assert not res.success and "without any token" in res.error


def test_body_has_ignore_eos_and_token_ids() -> None:
    body = build_body(BenchRequest(0, [5, 6], 2, 9), "m", {"top_k": 1})
    assert body["prompt"] == [5, 6] and body["max_tokens"] == 9 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True} and body["top_k"] == 1


def test_normalize_base_url() -> None:
    assert normalize_base_url("http://h:1/v1/") == "http://h:1"
    assert normalize_base_url("https://h") == "https://h"
    with pytest.raises(BenchInputError):
        normalize_base_url("h:1")
