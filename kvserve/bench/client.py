"""Async client for a streaming OpenAI-compatible `/v1/completions` endpoint (httpx + SSE).

Timing (all `time.perf_counter`, relative to the run's start):
  start_s   when the request was actually sent (after waiting for a --max-concurrency slot)
  ttft_s    first token event - start
  itl_s     gaps between successive token events
  e2el_s    the `[DONE]` line (or end of stream) - start

A *token event* is an SSE chunk with a choice whose `text` is non-empty, or whose text is empty
while `finish_reason` is still null (a token the server's detokenizer is holding back).  A closing
chunk with empty text and a finish_reason is not a token.  The output token count comes from the
final `usage` chunk (we ask for it with `stream_options.include_usage`); servers that do not send
usage are counted by token events.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import httpx

from kvserve.bench.datasets import BenchRequest
from kvserve.bench.errors import BenchInputError


@dataclass(slots=True)
class RequestResult:
    index: int
    prompt_len: int
    expected_output_len: int
    scheduled_s: float  # planned send time
    start_s: float = 0.0
    success: bool = False
    error: str = ""
    ttft_s: float | None = None
    e2el_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    token_events: int = 0
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    scheduling: dict[str, Any] | None = None  # the request's tenant / SLO body fields, if any

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2el - ttft) / (output_tokens - 1)."""
        if not self.success or self.ttft_s is None or self.e2el_s is None or self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)


def normalize_base_url(base_url: str) -> str:
    """Accept `http://host:port`, with or without a trailing `/` or `/v1`."""
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise BenchInputError(f"--base-url must start with http:// or https://, got {base_url!r}")
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def discover_model(base_url: str, model: str | None, timeout: float = 10.0) -> str:
    """Check the server answers; return `model`, or the first model it lists if none was given."""
    url = f"{base_url}/v1/models"
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            resp = await client.get(url)
    except httpx.HTTPError as exc:
        raise BenchInputError(f"cannot reach server at {url}: {type(exc).__name__}: {exc}") from None
    if model:
        return model
    if resp.status_code != 200:
        raise BenchInputError(f"{url} answered HTTP {resp.status_code}; pass --model explicitly")
    try:
        return str(resp.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchInputError(f"{url} did not list a model; pass --model explicitly") from None


def build_body(req: BenchRequest, model: str, extra_body: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "ignore_eos": True,  # non-standard (vLLM, kvserve): output lengths follow the workload
    }
    if req.body:
        body.update(req.body)
    body.update(extra_body)
    return body


def _error_text(payload: Any) -> str:
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(payload)


async def _stream_one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], res: RequestResult, t0: float
) -> None:
    start = time.perf_counter()
    res.start_s = start - t0
    last: float | None = None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raw = (await resp.aread()).decode("utf-8", "replace")
            try:
                msg = _error_text(json.loads(raw))
            except ValueError:
                msg = raw.strip()[:300]
            res.error = f"HTTP {resp.status_code}: {msg}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # SSE comments, event names, keep-alives
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                res.error = f"malformed SSE data: {data[:200]!r}"
                return
            if not isinstance(chunk, dict):
                res.error = f"malformed SSE chunk (not an object): {data[:200]!r}"
                return
            if "error" in chunk:
                res.error = f"stream error: {_error_text(chunk)}"
                return
            now = time.perf_counter()
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                res.usage_prompt_tokens = usage.get("prompt_tokens")
                res.usage_completion_tokens = usage.get("completion_tokens")
            for choice in chunk.get("choices") or []:
                text = choice.get("text") or ""
                if text or choice.get("finish_reason") is None:
                    if last is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
                    res.token_events += 1
                    break  # one event per chunk (n=1)
    res.e2el_s = time.perf_counter() - start
    res.output_tokens = (
        int(res.usage_completion_tokens) if res.usage_completion_tokens is not None else res.token_events
    )
    if res.ttft_s is None:
        res.error = "stream ended without any token"
        return
    res.success = True


async def run_requests(
    base_url: str,
    model: str,
    requests: Sequence[BenchRequest],
    send_times: Sequence[float],
    max_concurrency: int | None = None,
    extra_body: dict[str, Any] | None = None,
    timeout_s: float = 600.0,
    on_done: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Send every request at its send time; return results (in request order) and the wall time
    from the first send to the last completion."""
    assert len(requests) == len(send_times)
    url = f"{base_url}/v1/completions"
    extra = extra_body or {}
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    results = [
        RequestResult(r.index, r.prompt_len, r.output_len, scheduled_s=float(t), scheduling=r.body)
        for r, t in zip(requests, send_times)
    ]

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(req: BenchRequest, res: RequestResult) -> None:
            delay = t0 + res.scheduled_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                if sem is None:
                    await _stream_one(client, url, build_body(req, model, extra), res, t0)
                else:
                    async with sem:
                        await _stream_one(client, url, build_body(req, model, extra), res, t0)
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the run; record it
                res.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                res.success = False
            if on_done is not None:
                on_done(res)

        await asyncio.gather(*(one(q, r) for q, r in zip(requests, results)))
        duration = time.perf_counter() - t0
    return results, duration
