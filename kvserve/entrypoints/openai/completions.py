"""POST /v1/completions: prompts (text, token ids, or batches of either) -> completions.

Choice `index` is `prompt_index * n + sample_index` (OpenAI's and vLLM's rule for batch prompts).
"""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kvserve.blend.api import completion_segments
from kvserve.engine.async_engine import EngineDeadError, RequestStream
from kvserve.engine.engine_ipc import PositionLogprobs
from kvserve.entrypoints.openai.errors import OpenAIError, bad_request
from kvserve.entrypoints.openai.logprobs import CompletionLogprobsBuilder
from kvserve.entrypoints.openai.prompts import Prompt, check_prompt_fits, completion_prompts, has_text
from kvserve.entrypoints.openai.protocol import CompletionRequest, CompletionResponse
from kvserve.entrypoints.openai.sampling import build_sampling_params, check_completion
from kvserve.entrypoints.openai.scheduling import request_scheduling
from kvserve.entrypoints.openai.serving import (
    SSE_DONE, EngineStreamingResponse, RequestResult, ServerContext, collect, merge_deltas,
    raise_for_delta, sse_error, sse_event, unless_disconnected, usage_dict,
)


async def create_completion(ctx: ServerContext, request: Request) -> Response:
    arrival = time.time()
    body = await request.body()
    req = await ctx.parse(CompletionRequest, body)
    check_completion(req)
    model = ctx.resolve_model(req.model)
    if req.prompt is None and req.segments is None:
        raise bad_request("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if req.prompt is not None and req.segments is not None:
        raise bad_request("Give either 'prompt' or 'segments', not both.", "segments")
    segment_lens = None
    if req.segments is not None:  # CacheBlend (kvserve/blend/api.py): one prompt, as segments
        segs = req.segments
        text, ids, segment_lens = await ctx.tokenizers.run(
            len(body), lambda tok: completion_segments(segs, tok, ctx.info.max_model_len, req.n))
        prompts = [Prompt(ids, text)]
    elif has_text(req.prompt):
        # Off the event loop, on the lane for this body's size: a huge prompt must hold up
        # neither the streams in flight nor the small requests behind it.
        prompts = await ctx.tokenizers.run(
            len(body), lambda tok: completion_prompts(req.prompt, tok, req.add_special_tokens))
    else:
        prompts = completion_prompts(req.prompt, None, req.add_special_tokens)  # type: ignore[arg-type]
    for p in prompts:
        check_prompt_fits(p, req.max_tokens, ctx.info, "prompt")
    echo_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = build_sampling_params(req, vocab_size=ctx.info.vocab_size, max_tokens=req.max_tokens,
                                   logprobs=req.logprobs, prompt_logprobs=echo_logprobs)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    stream = ctx.submit([p.token_ids for p in prompts], params, request_id, arrival,
                        request_scheduling(req, ctx.scheduling), kv_transfer_params=req.kv_transfer_params,
                        segment_lens=segment_lens)
    view = _CompletionView(ctx, req, model, request_id, prompts, stream)
    if req.stream:
        return EngineStreamingResponse(view.sse(), ctx.engine, stream)
    try:
        results = await unless_disconnected(request, collect(stream))
    finally:
        if not stream.finished:
            ctx.engine.abort(stream.unfinished_ids)
    if results is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    body = view.response(results).model_dump()
    transfer = [r.kv_transfer_params for r in results.values() if r.kv_transfer_params is not None]
    if transfer:  # a prefill instance's answer (disaggregation: one prompt)
        body["kv_transfer_params"] = transfer[0]
    return JSONResponse(body)


class _CompletionView:
    """Renders one completion call's engine results as OpenAI JSON or SSE chunks."""

    def __init__(self, ctx: ServerContext, req: CompletionRequest, model: str, request_id: str,
                 prompts: list[Prompt], stream: RequestStream) -> None:
        self.ctx = ctx
        self.req = req
        self.model = model
        self.id = request_id
        self.created = int(time.time())
        self.prompts = prompts
        self.prompt_index = {rid: i for i, rid in enumerate(stream.request_ids)}
        self.stream = stream

    # --------------------------------------------------------------- echo
    def _prompt_text(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        tok = self.ctx.tokenizer
        return tok.decode(prompt.token_ids) if tok is not None else ""

    def _prompt_logprobs(self, builder: CompletionLogprobsBuilder, prompt: Prompt,
                         positions: Optional[list[Optional[PositionLogprobs]]]) -> dict[str, Any]:
        positions = list(positions or [None] * len(prompt.token_ids))
        tok = self.ctx.tokenizer
        first = [tok.decode([prompt.token_ids[0]]) if tok is not None else ""] + [""] * (len(prompt.token_ids) - 1)
        return builder.build(prompt.token_ids, positions, first)

    @staticmethod
    def _concat(a: Optional[dict[str, Any]], b: dict[str, Any]) -> dict[str, Any]:
        return b if a is None else {k: a[k] + b[k] for k in b}

    # ---------------------------------------------------------- non-stream
    def response(self, results: dict[str, RequestResult]) -> CompletionResponse:
        choices: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = cached = 0
        for rid, result in results.items():
            pi = self.prompt_index[rid]
            prompt = self.prompts[pi]
            prompt_tokens += len(prompt.token_ids)
            cached += result.num_cached_tokens
            for si in range(self.req.n):
                sample = result.sample(si)
                completion_tokens += len(sample.token_ids)
                text, logprobs = sample.text, None
                builder = CompletionLogprobsBuilder()
                if self.req.echo:
                    echo_text = self._prompt_text(prompt)
                    text = echo_text + text
                    if self.req.logprobs is not None:
                        logprobs = self._prompt_logprobs(builder, prompt, result.prompt_logprobs)
                    builder.offset = len(echo_text)
                if self.req.logprobs is not None:
                    logprobs = self._concat(logprobs, builder.build(sample.token_ids, list(sample.logprobs or [])))
                choices.append({"index": pi * self.req.n + si, "text": text, "logprobs": logprobs,
                                "finish_reason": sample.finish_reason, "stop_reason": sample.stop_reason})
        choices.sort(key=lambda c: int(c["index"]))
        return CompletionResponse.model_validate({
            "id": self.id, "created": self.created, "model": self.model, "choices": choices,
            "usage": usage_dict(prompt_tokens, completion_tokens, cached)})

    # -------------------------------------------------------------- stream
    async def sse(self) -> AsyncIterator[bytes]:
        opts = self.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous_usage = include_usage and bool(opts and opts.continuous_usage_stats)
        n = self.req.n
        builders: dict[int, CompletionLogprobsBuilder] = {}
        echoed: set[int] = set()
        prompt_logprobs: dict[str, Any] = {}
        completion_tokens = 0
        cached: dict[str, int] = {}
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        try:
            async for batch in self.stream:
                out = []
                for delta in merge_deltas(batch):
                    raise_for_delta(delta)
                    cached[delta.request_id] = delta.num_cached_tokens
                    if delta.prompt_logprobs is not None:
                        prompt_logprobs[delta.request_id] = delta.prompt_logprobs
                    pi = self.prompt_index[delta.request_id]
                    for s in delta.samples:
                        index = pi * n + s.index
                        completion_tokens += len(s.token_ids)
                        text, logprobs = s.text, None
                        builder = builders.setdefault(index, CompletionLogprobsBuilder())
                        if self.req.echo and index not in echoed:
                            echoed.add(index)
                            echo_text = self._prompt_text(self.prompts[pi])
                            text = echo_text + text
                            if self.req.logprobs is not None:
                                logprobs = self._prompt_logprobs(builder, self.prompts[pi],
                                                                 prompt_logprobs.get(delta.request_id))
                            builder.offset = len(echo_text)
                        if self.req.logprobs is not None:
                            logprobs = self._concat(logprobs, builder.build(s.token_ids, list(s.logprobs or [])))
                        chunk: dict[str, Any] = {
                            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                         "finish_reason": s.finish_reason, "stop_reason": s.stop_reason}],
                        }
                        if include_usage:
                            chunk["usage"] = (usage_dict(prompt_tokens, completion_tokens, sum(cached.values()))
                                              if continuous_usage else None)
                        out.append(sse_event(chunk))
                if out:
                    yield b"".join(out)
        except (OpenAIError, EngineDeadError) as exc:
            yield sse_error(exc)
            yield SSE_DONE
            return
        if include_usage:
            yield sse_event({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                             "choices": [], "usage": usage_dict(prompt_tokens, completion_tokens, sum(cached.values()))})
        yield SSE_DONE

