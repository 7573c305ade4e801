"""Prompts in, token ids out: tokenization, the chat template, and context-length checks.

All of it runs in the API process so that a prompt the engine could never
serve is refused with a 400 before it is queued.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from kvserve.engine.engine_ipc import EngineInfo
from kvserve.entrypoints.openai.errors import bad_request
from kvserve.entrypoints.openai.protocol import ChatMessage

# apply_chat_template's own arguments: chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})


@dataclass(slots=True)
class Prompt:
    token_ids: list[int]
    text: Optional[str] = None  # the text it came from, when there was one (for echo)


def require_tokenizer(tokenizer: Any, what: str) -> Any:
    if tokenizer is None:
        raise bad_request(f"This model has no tokenizer, so {what} is not available; send token ids instead.")
    return tokenizer


def has_text(prompt: str | list[Any]) -> bool:
    """Whether a (schema-checked) completion prompt has text to tokenize, rather than token ids."""
    return isinstance(prompt, str) or isinstance(prompt[0], str)


def completion_prompts(prompt: str | list[Any], tokenizer: Any, add_special_tokens: bool) -> list[Prompt]:
    """OpenAI's four prompt shapes: str, [str], [int], [[int]] (already shape-checked by the schema)."""
    if isinstance(prompt, str):
        texts: list[str] = [prompt]
    elif all(isinstance(t, int) for t in prompt):
        return [Prompt(list(prompt))]
    elif all(isinstance(p, list) for p in prompt):
        return [Prompt(list(p)) for p in prompt]
    else:
        texts = list(prompt)
    tok = require_tokenizer(tokenizer, "a text prompt")
    return [Prompt(tok.encode(t, add_special_tokens=add_special_tokens), t) for t in texts]


def render_chat(tokenizer: Any, messages: list[ChatMessage], *, add_generation_prompt: bool,
                continue_final_message: bool, chat_template_kwargs: Optional[dict[str, Any]]) -> str:
    tok = require_tokenizer(tokenizer, "chat")
    if not getattr(tok, "chat_template", None):
        raise bad_request("This model's tokenizer has no chat template; use /v1/completions.", "messages")
    kwargs = dict(chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
    if continue_final_message and add_generation_prompt:
        raise bad_request("continue_final_message cannot be combined with add_generation_prompt=true",
                          "continue_final_message")
    if continue_final_message and messages[-1].role != "assistant":
        raise bad_request("continue_final_message needs the last message to be from the assistant",
                          "continue_final_message")
    conversation = [m.for_template() for m in messages]
    try:
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message, **kwargs)
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception(), bad roles, ...: the client's messages
        raise bad_request(f"The chat template rejected the messages: {exc}", "messages") from None
    if not isinstance(text, str):
        raise bad_request("The chat template did not produce text", "messages")
    return text


def chat_prompt(tokenizer: Any, messages: list[ChatMessage], *, add_generation_prompt: bool,
                continue_final_message: bool, chat_template_kwargs: Optional[dict[str, Any]],
                add_special_tokens: bool) -> Prompt:
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                       continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs)
    return Prompt(tokenizer.encode(text, add_special_tokens=add_special_tokens), text)


def check_prompt_fits(prompt: Prompt, max_tokens: Optional[int], info: EngineInfo, param: str) -> None:
    """Refuse what the engine could never run (max_tokens None: generate up to the context length)."""
    n = len(prompt.token_ids)
    if n == 0:
        raise bad_request("The prompt is empty (it encodes to zero tokens).", param)
    limit = info.max_model_len
    if n >= limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, your prompt has "
                          f"{n} tokens, which leaves no room for the completion. Please shorten the prompt.",
                          param, "context_length_exceeded")
    # After the length check, so this scan (on the event loop) covers at most max_model_len ids.
    bad = [t for t in prompt.token_ids if not 0 <= t < info.vocab_size]
    if bad:
        raise bad_request(f"Token ids must be in [0, {info.vocab_size}); got {bad[:5]}.", param, "invalid_value")
    if max_tokens is not None and n + max_tokens > limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                          f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). "
                          "Please reduce the prompt or the completion length.", "max_tokens",
                          "context_length_exceeded")
    needed_blocks = -(-(n + 1) // info.block_size)
    if needed_blocks > info.num_kv_blocks:
        raise bad_request(f"The prompt has {n} tokens and needs {needed_blocks} KV-cache blocks, but this server "
                          f"has only {info.num_kv_blocks} blocks of {info.block_size} tokens.", param,
                          "context_length_exceeded")
