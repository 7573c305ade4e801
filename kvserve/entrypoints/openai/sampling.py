"""OpenAI request fields -> SamplingParams, with errors that name the request field."""
from __future__ import annotations

import re
from typing import Optional

from kvserve.entrypoints.openai.errors import bad_request
from kvserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from kvserve.sampling_params import SamplingParams

_FIELD_IN_ERROR = re.compile(r"SamplingParams\.(\w+)")


def _unsupported(param: str, detail: str = "") -> Exception:
    return bad_request(f"'{param}' is not supported by this server{detail}.", param, "unsupported_parameter")


def check_common(req: SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    if req.logit_bias:
        raise _unsupported("logit_bias")


def check_completion(req: CompletionRequest) -> None:
    check_common(req)
    if req.suffix is not None:
        raise _unsupported("suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise _unsupported("best_of", " (only best_of equal to n)")


def check_chat(req: ChatCompletionRequest) -> None:
    check_common(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("'logprobs' must be true when 'top_logprobs' is given.", "top_logprobs")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise _unsupported("response_format", " (only {'type': 'text'})")
    if req.tools:
        raise _unsupported("tools")
    if req.tool_choice not in (None, "none"):
        raise _unsupported("tool_choice")
    if req.functions:
        raise _unsupported("functions")
    if req.function_call not in (None, "none"):
        raise _unsupported("function_call")


def build_sampling_params(req: SamplingFields, *, vocab_size: int, max_tokens: Optional[int],
                          logprobs: Optional[int], prompt_logprobs: Optional[int] = None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        params = SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
            frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )
        params.check_vocab(vocab_size)
        return params
    except ValueError as exc:
        match = _FIELD_IN_ERROR.search(str(exc))
        field = match.group(1) if match else None
        param = {"logprobs": "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"}.get(
            field or "", field)
        raise bad_request(str(exc).replace("SamplingParams.", ""), param, "invalid_value") from None
