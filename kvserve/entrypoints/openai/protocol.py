"""OpenAI API schemas (pydantic v2), plus the vLLM extensions benchmarks send.

Requests are validated strictly, as OpenAI does: unknown fields are refused
(`extra="forbid"`), types are not coerced (`"0.5"` is not a number, `1.0` is
not an integer), and ranges are OpenAI's.  Fields OpenAI defines but this
server cannot honour (suffix, logit_bias, tools, ...) are accepted in the
schema so the error says "not supported" rather than "unrecognized".

Checks that involve several fields (stream_options without stream, ...)
live in the endpoint code, where the error can name its parameter.

Streaming chunks are built as plain dicts in the endpoint modules (hot path);
their shapes follow `CompletionResponse` / `ChatCompletionResponse` below.
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import InitErrorDetails, ValidationError

from kvserve.sampling_params import MAX_LOGPROBS

MAX_N = 128  # choices per request; more is a mistake, not a workload
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


# ============================================================================ requests
class StreamOptions(RequestModel):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False  # vLLM: usage on every chunk


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("must be a string, an array of strings, or null")


class SamplingFields(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None  # None: the (first) served model, as vLLM allows
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)  # 0 would keep no token: refused, as vLLM does
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # also the tenant of the `fair` policy unless `tenant` is given
    logit_bias: Optional[dict[str, float]] = None  # only empty/null is supported
    # Scheduling (docs/scheduling.md): vLLM's priority (lower first), the tenant the request
    # is accounted to, and latency targets in milliseconds.
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    tenant: Optional[str] = None
    slo_ttft_ms: Optional[float] = Field(None, gt=0)
    slo_tpot_ms: Optional[float] = Field(None, gt=0)
    # vLLM extensions.
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    # Prefill/decode disaggregation (vLLM's field; docs/disaggregation.md): {"do_remote_decode": true}
    # to a prefill instance, a prefill answer's object to a decode instance.
    kv_transfer_params: Optional[dict[str, Any]] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        return _check_stop(value)


def _check_prompt(value: Any) -> Any:
    """str | list[str] | list[int] | list[list[int]], non-empty (checked here for one clear message)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return value
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in value):
            return value
    if isinstance(value, list) and not value:
        raise ValueError("must not be empty")
    raise ValueError("must be a string, an array of strings, an array of token ids (integers), "
                     "or an array of non-empty token-id arrays")


class CompletionRequest(SamplingFields):
    prompt: Optional[Union[str, list[str], list[int], list[list[int]]]] = None
    # CacheBlend (docs/cacheblend.md): the prompt as segments (text or token ids each),
    # in place of `prompt`: a prefix, documents reused from cache at any position, a question.
    segments: Optional[list[Union[str, list[int]]]] = None
    max_tokens: Optional[int] = Field(16, ge=1)  # null: up to the context length
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1)  # only best_of == n (or null) is supported
    suffix: Optional[str] = None  # not supported
    add_special_tokens: bool = True  # vLLM: add BOS etc. when tokenizing a text prompt

    # OpenAPI: one of the two is required (the schema says so; _prompt_or_segments enforces it).
    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["prompt"]}, {"required": ["segments"]}]})

    @model_validator(mode="before")
    @classmethod
    def _prompt_or_segments(cls, data: Any) -> Any:
        """Neither `prompt` nor `segments`: the OpenAI error for a missing `prompt`, as before segments."""
        if isinstance(data, dict) and data.get("prompt") is None and data.get("segments") is None:
            raise ValidationError.from_exception_data(
                cls.__name__, [InitErrorDetails(type="missing", loc=("prompt",), input=data)])
        return data

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        return value if value is None else _check_prompt(value)


def _content_to_text(value: Any) -> Any:
    """Content is a string, null, or an array of text parts (joined with newlines, as vLLM does)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                raise ValueError(f"content part {i} must be an object")
            if part.get("type") != "text":
                raise ValueError(f"content part {i} has type {part.get('type')!r}; only 'text' parts are supported")
            if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ValueError(f"content part {i} must be {{'type': 'text', 'text': <string>}}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError("must be a string, an array of content parts, or null")


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[str] = None  # arrays of text parts are joined into a string on input
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    refusal: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        return _content_to_text(value)

    @model_validator(mode="after")
    def _content_required(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self

    def for_template(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)  # deprecated by OpenAI in favour of the next one
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    # OpenAI fields this server does not implement: only their "off" values are accepted.
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Union[str, dict[str, Any]]] = None
    # vLLM extensions.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # CacheBlend (docs/cacheblend.md): texts that appear verbatim in the messages (retrieved
    # documents); the rendered prompt is cut around them into segments, each document's KV
    # reused from cache wherever it lands.
    blend_documents: Optional[list[str]] = Field(None, min_length=1)


class TokenizeCompletionRequest(RequestModel):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: Optional[bool] = False


class TokenizeChatRequest(RequestModel):
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: Optional[bool] = False


class DetokenizeRequest(RequestModel):
    model: Optional[str] = None
    tokens: list[int]


# =========================================================================== responses
class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionLogProbs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None  # vLLM: the stop string or token id that matched


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[CompletionChoice]
    usage: UsageInfo


class ChatTopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(ResponseModel):
    content: Optional[list[ChatTokenLogprob]] = None
    refusal: Optional[list[ChatTokenLogprob]] = None


class ChatResponseMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None


class ChatChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[ChatChoice]
    usage: UsageInfo


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvserve"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeResponse(ResponseModel):
    prompt: str


class VersionResponse(ResponseModel):
    version: str


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo
