"""Malformed requests: each gets the matching 4xx with an OpenAI error object, and nothing breaks."""
from __future__ import annotations

import json
from typing import Any, Optional

import httpx
import pytest

LONG_PROMPT = [100] * 1100  # the tiny model's context is 1024 tokens
OK_COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_DROP = object()

# (name, method, path, body (dict -> JSON, bytes -> raw), expected status, expected param or None, expected code)
CASES: list[tuple[str, str, str, Any, int, Optional[str], Optional[str]]] = [
    ("invalid json", "POST", "/v1/completions", b"{bad json", 400, None, None),
    ("empty body", "POST", "/v1/completions", b"", 400, None, None),
    ("binary garbage", "POST", "/v1/completions", b"\xff\xfe\x00\x01", 400, None, None),
    ("body is an array", "POST", "/v1/completions", b"[1, 2]", 400, None, None),
    ("missing prompt", "POST", "/v1/completions", _with(OK_COMPLETION, prompt=_DROP), 400, "prompt",
     "missing_required_parameter"),
    ("missing messages", "POST", "/v1/chat/completions", _with(OK_CHAT, messages=_DROP), 400, "messages",
     "missing_required_parameter"),
    ("unknown field", "POST", "/v1/completions", _with(OK_COMPLETION, frobnicate=1), 400, "frobnicate",
     "unknown_parameter"),
    ("unknown message field", "POST", "/v1/chat/completions",
     _with(OK_CHAT, messages=[{"role": "user", "content": "hi", "mood": "x"}]), 400, "messages[0].mood",
     "unknown_parameter"),
    ("temperature is a string", "POST", "/v1/completions", _with(OK_COMPLETION, temperature="hot"), 400,
     "temperature", "invalid_type"),
    ("temperature too high", "POST", "/v1/completions", _with(OK_COMPLETION, temperature=5), 400, "temperature",
     "invalid_value"),
    ("top_p above 1", "POST", "/v1/chat/completions", _with(OK_CHAT, top_p=1.5), 400, "top_p", "invalid_value"),
    ("top_p is zero", "POST", "/v1/completions", _with(OK_COMPLETION, top_p=0), 400, "top_p", "invalid_value"),
    ("stop_token_ids out of vocabulary", "POST", "/v1/chat/completions",
     _with(OK_CHAT, stop_token_ids=[50, 10**6]), 400, "stop_token_ids", "invalid_value"),
    ("stop_token_ids out of vocabulary (completions)", "POST", "/v1/completions",
     _with(OK_COMPLETION, stop_token_ids=[10**6]), 400, "stop_token_ids", "invalid_value"),
    ("n is zero", "POST", "/v1/completions", _with(OK_COMPLETION, n=0), 400, "n", "invalid_value"),
    ("n far too large", "POST", "/v1/completions", _with(OK_COMPLETION, n=100000), 400, "n", "invalid_value"),
    ("negative max_tokens", "POST", "/v1/completions", _with(OK_COMPLETION, max_tokens=-1), 400, "max_tokens",
     "invalid_value"),
    ("max_tokens is a float", "POST", "/v1/completions", _with(OK_COMPLETION, max_tokens=2.5), 400, "max_tokens",
     "invalid_type"),
    ("logprobs too many", "POST", "/v1/completions", _with(OK_COMPLETION, logprobs=50), 400, "logprobs",
     "invalid_value"),
    ("top_logprobs without logprobs", "POST", "/v1/chat/completions", _with(OK_CHAT, top_logprobs=2), 400,
     "top_logprobs", None),
    ("presence_penalty out of range", "POST", "/v1/chat/completions", _with(OK_CHAT, presence_penalty=3.0), 400,
     "presence_penalty", "invalid_value"),
    ("stream is a string", "POST", "/v1/completions", _with(OK_COMPLETION, stream="yes"), 400, "stream",
     "invalid_type"),
    ("stream_options without stream", "POST", "/v1/completions",
     _with(OK_COMPLETION, stream_options={"include_usage": True}), 400, "stream_options", None),
    ("stop is a number", "POST", "/v1/completions", _with(OK_COMPLETION, stop=7), 400, "stop", None),
    ("seed is a float", "POST", "/v1/completions", _with(OK_COMPLETION, seed=1.5), 400, "seed", "invalid_type"),
    ("min_tokens above max_tokens", "POST", "/v1/completions", _with(OK_COMPLETION, min_tokens=5), 400,
     "min_tokens", "invalid_value"),
    ("unknown model", "POST", "/v1/completions", _with(OK_COMPLETION, model="gpt-9"), 404, "model",
     "model_not_found"),
    ("prompt longer than the context", "POST", "/v1/completions", _with(OK_COMPLETION, prompt=LONG_PROMPT), 400,
     "prompt", "context_length_exceeded"),
    ("prompt plus max_tokens over the context", "POST", "/v1/completions",
     _with(OK_COMPLETION, prompt=[100] * 1000, max_tokens=100), 400, "max_tokens", "context_length_exceeded"),
    ("chat longer than the context", "POST", "/v1/chat/completions",
     _with(OK_CHAT, messages=[{"role": "user", "content": "word " * 1100}]), 400, "messages",
     "context_length_exceeded"),
    ("empty prompt list", "POST", "/v1/completions", _with(OK_COMPLETION, prompt=[]), 400, "prompt", None),
    ("empty prompt string", "POST", "/v1/completions", _with(OK_COMPLETION, prompt=""), 400, "prompt", None),
    ("token id out of vocabulary", "POST", "/v1/completions", _with(OK_COMPLETION, prompt=[1, 10**9]), 400,
     "prompt", "invalid_value"),
    ("mixed prompt list", "POST", "/v1/completions", _with(OK_COMPLETION, prompt=[1, "a"]), 400, "prompt", None),
    ("empty messages", "POST", "/v1/chat/completions", _with(OK_CHAT, messages=[]), 400, "messages", None),
    ("bad role", "POST", "/v1/chat/completions", _with(OK_CHAT, messages=[{"role": "wizard", "content": "x"}]),
     400, "messages[0].role", "invalid_value"),
    ("message without role", "POST", "/v1/chat/completions", _with(OK_CHAT, messages=[{"content": "x"}]), 400,
     "messages[0].role", "missing_required_parameter"),
    ("content is a number", "POST", "/v1/chat/completions",
     _with(OK_CHAT, messages=[{"role": "user", "content": 42}]), 400, "messages[0].content", None),
    ("image content part", "POST", "/v1/chat/completions",
     _with(OK_CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages[0].content", None),
    ("tools are unsupported", "POST", "/v1/chat/completions",
     _with(OK_CHAT, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "unsupported_parameter"),
    ("suffix is unsupported", "POST", "/v1/completions", _with(OK_COMPLETION, suffix="x"), 400, "suffix",
     "unsupported_parameter"),
    ("logit_bias is unsupported", "POST", "/v1/completions", _with(OK_COMPLETION, logit_bias={"50": 1.0}), 400,
     "logit_bias", "unsupported_parameter"),
    ("best_of differs from n", "POST", "/v1/completions", _with(OK_COMPLETION, best_of=3), 400, "best_of",
     "unsupported_parameter"),
    ("detokenize bad id", "POST", "/detokenize", {"tokens": [-1]}, 400, "tokens", None),
    ("tokenize missing prompt", "POST", "/tokenize", {"model": "tiny"}, 400, "prompt",
     "missing_required_parameter"),
    ("GET on a POST route", "GET", "/v1/completions", None, 405, None, None),
    ("unknown route", "POST", "/v1/engines/davinci/completions", OK_COMPLETION, 404, None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_gets_openai_error(server, case) -> None:  # type: ignore[no-untyped-def]
    name, method, path, body, status, param, code = case
    kwargs: dict[str, Any] = {}
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"Content-Type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    resp = httpx.request(method, server.base_url + path, timeout=30, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_enough_kinds_of_malformed_requests() -> None:
    assert len(CASES) >= 20


def test_server_still_correct_after_malformed_requests(server, client) -> None:  # type: ignore[no-untyped-def]
    a = client.completions.create(model="tiny", prompt="hi", max_tokens=6, temperature=0.0)
    # Fire a burst of bad requests mixed with good ones; the good ones are unaffected.
    with httpx.Client(timeout=30) as http:
        for _ in range(5):
            assert http.post(server.base_url + "/v1/completions", content=b"{nope").status_code == 400
            again = http.post(server.base_url + "/v1/completions",
                              json={"model": "tiny", "prompt": "hi", "max_tokens": 6, "temperature": 0.0})
            assert again.status_code == 200
            assert again.json()["choices"][0]["text"] == a.choices[0].text
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert "Traceback" not in server.log_text(), "a request made the server log an unhandled exception"


def test_error_event_shape_is_json(server) -> None:  # type: ignore[no-untyped-def]
    # Streaming requests are validated before the stream starts, so a bad one is a plain 400, not SSE.
    resp = httpx.post(server.base_url + "/v1/completions",
                      json=_with(OK_COMPLETION, stream=True, temperature=-1), timeout=30)
    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("application/json")
    assert json.loads(resp.text)["error"]["param"] == "temperature"
