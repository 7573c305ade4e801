"""POST /v1/chat/completions: messages -> the model's chat template -> one engine request (n samples)."""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kvserve.blend.api import chat_segments
from kvserve.engine.async_engine import EngineDeadError, RequestStream
from kvserve.entrypoints.openai.errors import OpenAIError
from kvserve.entrypoints.openai.logprobs import chat_logprobs
from kvserve.entrypoints.openai.prompts import Prompt, chat_prompt, check_prompt_fits
from kvserve.entrypoints.openai.protocol import ChatCompletionRequest, ChatCompletionResponse
from kvserve.entrypoints.openai.sampling import build_sampling_params, check_chat
from kvserve.entrypoints.openai.scheduling import request_scheduling
from kvserve.entrypoints.openai.serving import (
    SSE_DONE, EngineStreamingResponse, RequestResult, ServerContext, collect, merge_deltas,
    raise_for_delta, sse_error, sse_event, unless_disconnected, usage_dict,
)


async def create_chat_completion(ctx: ServerContext, request: Request) -> Response:
    arrival = time.time()
    body = await request.body()
    req = await ctx.parse(ChatCompletionRequest, body)
    check_chat(req)
    model = ctx.resolve_model(req.model)
    # Off the event loop, on the lane for this body's size: a long conversation must hold up
    # neither the streams in flight nor the small requests behind it.
    prompt = await ctx.tokenizers.run(len(body), lambda tok: chat_prompt(
        tok, req.messages, add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message, chat_template_kwargs=req.chat_template_kwargs,
        add_special_tokens=req.add_special_tokens))
    segment_lens = None
    if req.blend_documents is not None:  # CacheBlend: the rendered prompt cut around the documents
        docs, text = req.blend_documents, prompt.text or ""
        ids, segment_lens = await ctx.tokenizers.run(
            len(body), lambda tok: chat_segments(text, docs, tok, ctx.info.max_model_len, req.n))
        prompt = Prompt(ids, text)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    check_prompt_fits(prompt, max_tokens, ctx.info, "messages")
    num_top = req.top_logprobs or 0
    params = build_sampling_params(req, vocab_size=ctx.info.vocab_size, max_tokens=max_tokens,
                                   logprobs=num_top if req.logprobs else None)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    stream = ctx.submit([prompt.token_ids], params, request_id, arrival, request_scheduling(req, ctx.scheduling),
                        kv_transfer_params=req.kv_transfer_params, segment_lens=segment_lens)
    view = _ChatView(req, model, request_id, prompt, stream, num_top)
    if req.stream:
        return EngineStreamingResponse(view.sse(), ctx.engine, stream)
    try:
        results = await unless_disconnected(request, collect(stream))
    finally:
        if not stream.finished:
            ctx.engine.abort(stream.unfinished_ids)
    if results is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    body = view.response(results[request_id]).model_dump()
    if results[request_id].kv_transfer_params is not None:  # a prefill instance's answer (disaggregation)
        body["kv_transfer_params"] = results[request_id].kv_transfer_params
    return JSONResponse(body)


class _ChatView:
    def __init__(self, req: ChatCompletionRequest, model: str, request_id: str, prompt: Prompt,
                 stream: RequestStream, num_top: int) -> None:
        self.req = req
        self.model = model
        self.id = request_id
        self.created = int(time.time())
        self.prompt = prompt
        self.stream = stream
        self.num_top = num_top

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}

    def response(self, result: RequestResult) -> ChatCompletionResponse:
        choices = []
        completion_tokens = 0
        for index in range(self.req.n):
            sample = result.sample(index)
            completion_tokens += len(sample.token_ids)
            logprobs = None
            if self.req.logprobs:
                logprobs = {"content": chat_logprobs(sample.token_ids, sample.logprobs or [], self.num_top),
                            "refusal": None}
            choices.append({"index": index, "message": {"role": "assistant", "content": sample.text},
                            "logprobs": logprobs, "finish_reason": sample.finish_reason,
                            "stop_reason": sample.stop_reason})
        return ChatCompletionResponse.model_validate({
            "id": self.id, "created": self.created, "model": self.model, "choices": choices,
            "usage": usage_dict(len(self.prompt.token_ids), completion_tokens, result.num_cached_tokens)})

    async def sse(self) -> AsyncIterator[bytes]:
        opts = self.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous_usage = include_usage and bool(opts and opts.continuous_usage_stats)
        prompt_tokens = len(self.prompt.token_ids)
        completion_tokens = cached = 0

        def withusage_dict(chunk: dict[str, Any]) -> dict[str, Any]:
            if include_usage:
                chunk["usage"] = usage_dict(prompt_tokens, completion_tokens, cached) if continuous_usage else None
            return chunk

        # As OpenAI does: each choice opens with the assistant role and empty content.
        yield b"".join(sse_event(withusage_dict(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}])))
                       for i in range(self.req.n))
        try:
            async for batch in self.stream:
                out = []
                for delta in merge_deltas(batch):
                    raise_for_delta(delta)
                    cached = delta.num_cached_tokens
                    for s in delta.samples:
                        completion_tokens += len(s.token_ids)
                        logprobs = None
                        if self.req.logprobs and s.logprobs:
                            logprobs = {"content": chat_logprobs(s.token_ids, s.logprobs, self.num_top),
                                        "refusal": None}
                        choice = {"index": s.index, "delta": {"content": s.text} if s.text else {},
                                  "logprobs": logprobs, "finish_reason": s.finish_reason,
                                  "stop_reason": s.stop_reason}
                        out.append(sse_event(withusage_dict(self._chunk([choice]))))
                if out:
                    yield b"".join(out)
        except (OpenAIError, EngineDeadError) as exc:
            yield sse_error(exc)
            yield SSE_DONE
            return
        if include_usage:
            chunk = self._chunk([])
            chunk["usage"] = usage_dict(prompt_tokens, completion_tokens, cached)
            yield sse_event(chunk)
        yield SSE_DONE

