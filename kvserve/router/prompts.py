"""Request body -> prompt token ids -> block hashes, exactly as a kvserve instance computes them.

The KV-aware policy compares a request's block hashes with the index, so they must be the
engine's own: the same tokenizer (`--tokenizer`, the instances' model directory), the same chat
template and special-token rules as the server (the server's own `chat_prompt` and defaults are
used), the same block size, and `kvserve.hashing.hash_block_tokens`.  A body the router cannot
tokenize is still forwarded; it is routed without hashes and the instance answers it (with its
own 400, if it is bad).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from kvserve.hashing import BlockHash, hash_block_tokens

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RouteRequest:
    """What a policy may know about a request."""

    path: str = "/v1/completions"
    num_prompt_tokens: Optional[int] = None  # None: not tokenized
    block_hashes: list[BlockHash] = field(default_factory=list)  # full prompt blocks, in order

    def num_blocks(self, block_size: int) -> int:
        """KV blocks the prompt occupies (at least one, also when unknown)."""
        if not self.num_prompt_tokens:
            return 1
        return -(-self.num_prompt_tokens // block_size)


def completion_token_ids(body: dict[str, Any], tokenizer: Any) -> Optional[list[int]]:
    """Token ids of a /v1/completions prompt (the first prompt of a batch: the batch goes to one
    instance, and its prompts usually share their prefix)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        return None
    if isinstance(prompt, str) and tokenizer is not None:
        add_special = body.get("add_special_tokens", True)  # the server's default for completions
        return list(tokenizer.encode(prompt, add_special_tokens=bool(add_special)))
    return None


def chat_token_ids(body: dict[str, Any], tokenizer: Any) -> Optional[list[int]]:
    """Token ids of a /v1/chat/completions conversation, through the server's own chat rendering."""
    if tokenizer is None or not isinstance(body.get("messages"), list):
        return None
    from kvserve.entrypoints.openai.prompts import chat_prompt
    from kvserve.entrypoints.openai.protocol import ChatMessage

    messages = [ChatMessage.model_validate(m) for m in body["messages"]]
    prompt = chat_prompt(tokenizer, messages, add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                         continue_final_message=bool(body.get("continue_final_message", False)),
                         chat_template_kwargs=body.get("chat_template_kwargs"),
                         add_special_tokens=bool(body.get("add_special_tokens", False)))
    return prompt.token_ids


class PromptHasher:
    """Turns a parsed request body into a `RouteRequest` (token count and block hashes)."""

    def __init__(self, tokenizer: Any, block_size: int, extra_keys: bytes = b"") -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.extra_keys = extra_keys
        self.failures = 0  # bodies that could not be tokenized (routed without hashes)

    def token_ids(self, path: str, body: Any) -> Optional[list[int]]:
        if not isinstance(body, dict):
            return None
        try:
            if path.endswith("/chat/completions"):
                return chat_token_ids(body, self.tokenizer)
            return completion_token_ids(body, self.tokenizer)
        except Exception as exc:  # noqa: BLE001 - a bad body is the instance's to refuse, not ours
            self.failures += 1
            logger.debug("cannot tokenize a %s body for routing: %s", path, exc)
            return None

    def route_request(self, path: str, body: Any) -> RouteRequest:
        ids = self.token_ids(path, body)
        if ids is None:
            return RouteRequest(path)
        return RouteRequest(path, len(ids), hash_block_tokens(ids, self.block_size, extra_keys=self.extra_keys))


def max_matchable_blocks(num_prompt_tokens: int, block_size: int) -> int:
    """Most leading blocks the engine can take from its prefix cache: never the last prompt token
    (its logits are needed), as KVCacheManager.get_computed_blocks."""
    return max(0, (num_prompt_tokens - 1) // block_size)
