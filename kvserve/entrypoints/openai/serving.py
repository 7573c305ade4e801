"""What every generation endpoint shares: admission, collecting results, SSE, disconnects.

`ServerContext` holds the live objects one server needs (engine handle,
tokenizer, limits, metrics); endpoints get it from `app.state.ctx`.
"""
from __future__ import annotations

import asyncio
import copy
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from kvserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from kvserve.engine.engine_ipc import AddRequest, EngineInfo, PositionLogprobs, RequestDelta, SampleDelta
from kvserve.entrypoints.openai.errors import OpenAIError, bad_request, from_validation_error
from kvserve.entrypoints.openai.defaults import DEFAULT_BODY_READ_TIMEOUT_S, DEFAULT_MAX_REQUEST_BYTES
from kvserve.entrypoints.openai.guard import DrainState
from kvserve.entrypoints.openai.kv_events import KVEventLog
from kvserve.entrypoints.openai.scheduling import RequestScheduling, SchedulingDefaults
from kvserve.metrics import ServerMetrics

# The message prefix of a failed KV transfer (kvserve.disagg.source.KV_TRANSFER_ERROR; not imported,
# to keep torch out of the API process's imports).
KV_TRANSFER_ERROR = "KV transfer failed: "
from kvserve.sampling_params import SamplingParams

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

RETRY_AFTER_S = 1
SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Bodies at least this large are parsed and tokenized on the "large" lane (see TokenizerLanes).
LARGE_BODY_BYTES = 64 * 1024


class TokenizerLanes:
    """Tokenizer work (JSON parsing of large bodies, encode, chat template) off the event loop.

    Two single-thread lanes, each with its own copy of the tokenizer: bodies under
    LARGE_BODY_BYTES go to the small lane, larger ones to the large lane.  A huge prompt
    (seconds to encode) therefore delays only other huge prompts, never a small request;
    and no two threads ever call into one (stateful) HF tokenizer at once.  The encode of
    HF fast tokenizers releases the GIL, so the event loop keeps serving meanwhile.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._lanes = [(ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kvserve-tokenizer-{name}"),
                        copy.deepcopy(tokenizer) if tokenizer is not None else None)
                       for name in ("small", "large")]

    def lane(self, size: int) -> int:
        return int(size >= LARGE_BODY_BYTES)

    async def run(self, size: int, fn: Callable[[Any], T]) -> T:
        """`fn(tokenizer)` on the lane for a body of `size` bytes (tokenizer: that lane's copy, or None)."""
        executor, tokenizer = self._lanes[self.lane(size)]
        return await asyncio.get_running_loop().run_in_executor(executor, fn, tokenizer)

    def shutdown(self) -> None:
        for executor, _ in self._lanes:
            executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class ServerContext:
    engine: AsyncEngine
    info: EngineInfo
    tokenizer: Any  # HF tokenizer, or None for a model without one (token-id prompts only)
    served_model_names: list[str]
    metrics: ServerMetrics
    max_queue_len: Optional[int] = None  # None: unbounded
    # Admission control on the KV cache: with the cache at least this full (fraction) and
    # requests already waiting in the engine, new requests get 429 (None: off).
    admission_kv_limit: Optional[float] = None
    scheduling: SchedulingDefaults = field(default_factory=SchedulingDefaults)
    api_key: Optional[str] = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    body_read_timeout_s: float = DEFAULT_BODY_READ_TIMEOUT_S
    tokenizers: TokenizerLanes = field(init=False)
    drain: DrainState = field(default_factory=lambda: DrainState())
    kv_events: Optional[KVEventLog] = None  # GET /kv_events (routers follow the prefix cache)

    def __post_init__(self) -> None:
        self.tokenizers = TokenizerLanes(self.tokenizer)

    async def parse(self, model: type[M], body: bytes) -> M:
        """`parse_body`, on the large lane for a large body (parsing megabytes of token ids takes
        a noticeable fraction of a second; the event loop must not stall for it)."""
        if self.tokenizers.lane(len(body)) == 0:
            return parse_body(model, body)
        return await self.tokenizers.run(len(body), lambda _tok: parse_body(model, body))

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def resolve_model(self, requested: Optional[str]) -> str:
        if requested is None:
            return self.model_name
        if requested not in self.served_model_names:
            raise OpenAIError(404, f"The model '{requested}' does not exist.", param="model",
                              code="model_not_found")
        return requested

    def submit(self, prompts: list[list[int]], params: SamplingParams, id_prefix: str,
               arrival_time: float, sched: Optional[RequestScheduling] = None,
               kv_transfer_params: Optional[dict[str, Any]] = None,
               segment_lens: Optional[list[int]] = None) -> RequestStream:
        """Admit one API call's prompts (each becomes one engine request) or raise 503/429/400.
        `sched`: the call's priority, tenant and SLO (scheduling.request_scheduling);
        `kv_transfer_params`: prefill/decode disaggregation (one prompt only);
        `segment_lens`: the one prompt is these segments (CacheBlend, docs/cacheblend.md)."""
        if kv_transfer_params is not None and len(prompts) != 1:
            raise bad_request("kv_transfer_params needs exactly one prompt", "kv_transfer_params")
        if self.drain.expired:
            raise self.drain.error()
        if not self.engine.is_healthy():
            raise OpenAIError(503, f"The engine is not available: {self.engine.dead_reason or 'shutting down'}.",
                              code="engine_unavailable")
        if self.max_queue_len is not None:
            if len(prompts) > self.max_queue_len:
                raise bad_request(f"The request has {len(prompts)} prompts but the server queues at most "
                                  f"{self.max_queue_len}; send fewer prompts per request.", "prompt")
            if self.engine.num_queued + len(prompts) > self.max_queue_len:
                raise OpenAIError(429, f"The server is at capacity ({self.engine.num_queued} requests waiting); "
                                       "retry later.", code="queue_full",
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
        stats = self.engine.stats
        if (self.admission_kv_limit is not None and stats.kv_cache_usage >= self.admission_kv_limit
                and stats.num_waiting > 0):
            raise OpenAIError(429, f"The KV cache is full ({stats.kv_cache_usage:.0%} in use, {stats.num_waiting} "
                                   "requests waiting for room); retry later.", code="kv_cache_full",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
        s = sched or RequestScheduling()
        ids = [id_prefix] if len(prompts) == 1 else [f"{id_prefix}-{i}" for i in range(len(prompts))]
        try:
            return self.engine.add_requests([AddRequest(rid, ids_, params, arrival_time=arrival_time,
                                                        priority=s.priority, tenant=s.tenant, slo=s.slo,
                                                        kv_transfer_params=kv_transfer_params,
                                                        segment_lens=segment_lens)
                                             for rid, ids_ in zip(ids, prompts)])
        except EngineDeadError as exc:
            raise OpenAIError(503, f"The engine is not available: {exc}.", code="engine_unavailable") from None

    def expire_in_flight(self) -> int:
        """The drain deadline has passed: end every in-flight request with a 503 error object.

        Non-streaming requests answer 503 JSON, streams send a final `error` event and
        `[DONE]` (their handlers see the error on their engine stream), requests still
        reading their body get a 503 from the guard, and later ones from `submit`.
        Returns the number of API calls ended."""
        self.drain.expire()
        return self.engine.fail_in_flight(self.drain.error())


def parse_body(model: type[M], body: bytes) -> M:
    """Strictly validate a JSON body (parse errors included) into `model`, or raise a 400."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


# --------------------------------------------------------------------------- results
@dataclass
class SampleResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[PositionLogprobs]] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[str | int] = None

    def add(self, d: SampleDelta) -> None:
        self.text += d.text
        self.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(d.logprobs)
        if d.finish_reason is not None:
            self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason


@dataclass
class RequestResult:
    samples: dict[int, SampleResult] = field(default_factory=dict)
    num_cached_tokens: int = 0
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = None
    kv_transfer_params: Optional[dict[str, Any]] = None  # a prefill instance's answer (disaggregation)

    def add(self, d: RequestDelta) -> None:
        if d.kv_transfer_params is not None:
            self.kv_transfer_params = d.kv_transfer_params
        for s in d.samples:
            self.samples.setdefault(s.index, SampleResult()).add(s)
        self.num_cached_tokens = max(self.num_cached_tokens, d.num_cached_tokens)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs

    def sample(self, index: int) -> SampleResult:
        return self.samples.setdefault(index, SampleResult())


def raise_for_delta(delta: RequestDelta) -> None:
    """A delta carrying an error becomes the matching OpenAI error."""
    if delta.error is None:
        return
    if delta.rejected and delta.retry_after_s is not None:
        raise OpenAIError(429, delta.error, code="slo_unattainable",
                          headers={"Retry-After": str(max(1, math.ceil(delta.retry_after_s)))})
    if delta.rejected:
        raise bad_request(delta.error)
    if delta.error.startswith(KV_TRANSFER_ERROR):  # kvserve/disagg: never recomputed, a retry elsewhere may work
        raise OpenAIError(503, delta.error, code="kv_transfer_failed", headers={"Retry-After": str(RETRY_AFTER_S)})
    raise OpenAIError(500, f"The request failed in the engine: {delta.error}", code="engine_error")


def error_from_exception(exc: BaseException) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, f"The engine is not available: {exc}.", code="engine_unavailable")
    return OpenAIError(500, f"Internal server error: {type(exc).__name__}: {exc}")


async def collect(stream: RequestStream) -> dict[str, RequestResult]:
    """Wait for every request of `stream` to finish; raise the first error."""
    results = {rid: RequestResult() for rid in stream.request_ids}
    try:
        async for batch in stream:
            for delta in batch:
                raise_for_delta(delta)
                results[delta.request_id].add(delta)
    except EngineDeadError as exc:
        raise error_from_exception(exc) from None
    return results


def _copy(s: SampleDelta) -> SampleDelta:
    return SampleDelta(s.index, s.text, list(s.token_ids), None if s.logprobs is None else list(s.logprobs),
                       s.finish_reason, s.stop_reason)


def merge_deltas(batch: list[RequestDelta]) -> list[RequestDelta]:
    """Fold the deltas of each request in `batch` into one (a slow client catches up in one chunk)."""
    merged: dict[str, RequestDelta] = {}
    for d in batch:
        cur = merged.get(d.request_id)
        if cur is None:
            merged[d.request_id] = RequestDelta(d.request_id, [_copy(s) for s in d.samples], d.finished,
                                                d.num_cached_tokens, d.prompt_logprobs, d.error, d.rejected,
                                                d.retry_after_s, d.kv_transfer_params)
            continue
        by_index = {s.index: s for s in cur.samples}
        for s in d.samples:
            t = by_index.get(s.index)
            if t is None:
                t = by_index[s.index] = _copy(s)
                cur.samples.append(t)
                continue
            t.text += s.text
            t.token_ids.extend(s.token_ids)
            if s.logprobs is not None:
                t.logprobs = (t.logprobs or []) + s.logprobs
            if s.finish_reason is not None:
                t.finish_reason, t.stop_reason = s.finish_reason, s.stop_reason
        cur.finished = cur.finished or d.finished
        cur.num_cached_tokens = max(cur.num_cached_tokens, d.num_cached_tokens)
        cur.prompt_logprobs = cur.prompt_logprobs or d.prompt_logprobs
        cur.error = cur.error or d.error
        cur.rejected = cur.rejected or d.rejected
        cur.retry_after_s = cur.retry_after_s if cur.retry_after_s is not None else d.retry_after_s
        cur.kv_transfer_params = cur.kv_transfer_params or d.kv_transfer_params
    return list(merged.values())


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# ------------------------------------------------------------------------------- SSE
def sse_event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_error(exc: BaseException) -> bytes:
    return sse_event(error_from_exception(exc).body())


# ------------------------------------------------------------------------ disconnects
async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> Optional[T]:
    """Run `work`; if the client disconnects first, cancel it and return None.

    Call after the body has been read: from then on `receive()` only reports
    the disconnect.  Cancelling `work` runs its `finally` blocks, which abort
    its engine requests.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task  # its result, or (cancelled) after its cleanup has run
    except asyncio.CancelledError:
        if not task.cancelled():
            raise  # this coroutine itself is being cancelled: not a disconnect
        return None


class EngineStreamingResponse(StreamingResponse):
    """An SSE response that aborts its engine requests however it ends.

    Done, client disconnect (Starlette cancels the send loop), a failed write,
    or a cancellation before the first chunk: `__call__` always reaches its
    `finally`, so no engine request outlives its response.
    """

    def __init__(self, chunks: AsyncIterator[bytes], engine: AsyncEngine, stream: RequestStream) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
        self._engine = engine
        self._stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._stream.finished:
                self._engine.abort(self._stream.unfinished_ids)
