"""Prompts given as segments: `{"segments": [seg0, seg1, ...]}`, each text or token ids.

Text segments are tokenized one by one (the first with the tokenizer's special tokens,
e.g. a BOS, the others without), so each document's tokens are the same wherever it
appears: that is what lets its KV be found again.  The prompt is their concatenation.
"""
from __future__ import annotations

from typing import Any, Optional


def tokenize_segments(tokenizer: Any, segments: Any) -> tuple[Optional[str], list[int], list[int]]:
    """(prompt text or None, token ids, segment lengths); ValueError for a malformed list."""
    if not isinstance(segments, (list, tuple)) or not segments:
        raise ValueError("segments must be a non-empty list of strings or of token-id lists")
    ids: list[int] = []
    lens: list[int] = []
    texts: list[str] = []
    for i, seg in enumerate(segments):
        if isinstance(seg, str):
            if tokenizer is None:
                raise ValueError("this model has no tokenizer; give segments as token-id lists")
            toks = tokenizer.encode(seg, add_special_tokens=i == 0)
            texts.append(seg)
        elif isinstance(seg, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in seg):
            toks = list(seg)
        else:
            raise ValueError(f"segment {i} must be a string or a list of token ids, got {type(seg).__name__}")
        ids.extend(toks)
        lens.append(len(toks))
    text = "".join(texts) if len(texts) == len(segments) else None
    return text, ids, lens

