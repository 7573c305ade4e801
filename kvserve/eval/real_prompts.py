"""Real prompts for the token metrics: ShareGPT first turns through the model's chat template.

The packaged sample (data/sharegpt_sample.json: 64 prompts, selection and source recorded in the
file) keeps `kvserve eval` self-contained; `path` may name any ShareGPT-style JSON array instead.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

SAMPLE = Path(__file__).resolve().parent / "data" / "sharegpt_sample.json"


def load_prompts(path: Optional[str | Path] = None) -> list[str]:
    """Prompt texts from the packaged sample ({"prompts": [{"prompt": ...}]}) or a ShareGPT
    array ([{"conversations": [{"value": ...}, ...]}]: the first turn of each)."""
    p = Path(path) if path else SAMPLE
    if not p.is_file():
        raise FileNotFoundError(f"{p}: prompts file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        texts = [x.get("prompt") for x in data["prompts"] if isinstance(x, dict)]
    elif isinstance(data, list):
        texts = []
        for x in data:
            conv = x.get("conversations") if isinstance(x, dict) else None
            if isinstance(conv, list) and conv and isinstance(conv[0], dict):
                texts.append(conv[0].get("value"))
    else:
        raise ValueError(f"{p}: expected a ShareGPT array or kvserve's {{'prompts': [...]}} sample")
    out = [t for t in texts if isinstance(t, str) and t.strip()]
    if not out:
        raise ValueError(f"{p}: no prompts found")
    return out


def _templated(tok: Any, text: str) -> list[int]:
    if getattr(tok, "chat_template", None):
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
        return list(tok.encode(rendered, add_special_tokens=False))
    return list(tok.encode(text))


def chat_prompt_ids(tok: Any, text: str, max_len: int) -> list[int]:
    """Token ids of `text` as one user turn (chat template when the tokenizer has one), the user
    text cut from the end until the whole prompt fits `max_len` tokens."""
    ids = _templated(tok, text)
    content = list(tok.encode(text, add_special_tokens=False))
    keep = len(content)
    while len(ids) > max_len and keep > 1:
        keep = max(1, keep - (len(ids) - max_len))
        ids = _templated(tok, tok.decode(content[:keep]))
    return ids


def sharegpt_token_prompts(tok: Any, num: int, max_len: int, path: Optional[str | Path] = None) -> list[list[int]]:
    """The first `num` prompts of the file, as chat-templated token ids of at most `max_len`."""
    texts = load_prompts(path)
    if num > len(texts):
        raise ValueError(f"asked for {num} prompts; the file has {len(texts)}")
    return [chat_prompt_ids(tok, t, max_len) for t in texts[:num]]
