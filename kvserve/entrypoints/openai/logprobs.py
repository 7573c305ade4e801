"""Engine logprobs (per position: [(token_id, logprob, rank, decoded)], most likely first) in OpenAI's shapes.

Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"} - parallel lists; the
    top_logprobs dict holds the top-k plus the sampled token (so up to k + 1 entries, as OpenAI says).
Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [top-k entries]}]}.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from kvserve.engine.engine_ipc import PositionLogprobs

# JSON has no -Infinity; vLLM reports impossible tokens with this value.
_MIN_LOGPROB = -9999.0


def _clean(lp: float) -> float:
    return lp if math.isfinite(lp) else _MIN_LOGPROB


def _sampled(position: PositionLogprobs, token_id: int) -> tuple[str, Optional[float]]:
    for tid, lp, _, text in position:
        if tid == token_id:
            return text, _clean(lp)
    return "", None  # the engine always includes the sampled token; never expected


class CompletionLogprobsBuilder:
    """Accumulates the completions logprobs object for one choice; text offsets run across calls."""

    def __init__(self, text_offset: int = 0) -> None:
        self.offset = text_offset

    def build(self, token_ids: list[int], positions: list[Optional[PositionLogprobs]],
              token_texts: Optional[list[str]] = None) -> dict[str, Any]:
        """`positions[i]` is None where no logprob exists (the first prompt token under echo);
        `token_texts` gives the token strings there (else they come from the entries)."""
        out: dict[str, Any] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for i, (tid, position) in enumerate(zip(token_ids, positions)):
            top: Optional[dict[str, float]] = None
            if position is None:
                text, lp = (token_texts[i] if token_texts else ""), None
            else:
                text, lp = _sampled(position, tid)
                top = {}
                for _, entry_lp, _, entry_text in position:
                    top.setdefault(entry_text, _clean(entry_lp))
            out["text_offset"].append(self.offset)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(top)
            self.offset += len(text)
        return out


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], num_top: int) -> list[dict[str, Any]]:
    content = []
    for tid, position in zip(token_ids, positions):
        text, lp = _sampled(position, tid)
        content.append({
            "token": text,
            "logprob": lp if lp is not None else _MIN_LOGPROB,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": _clean(l), "bytes": list(t.encode("utf-8"))}
                             for _, l, _, t in position[:num_top]],
        })
    return content
