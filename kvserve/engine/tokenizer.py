"""Tokenizer loading from a local model directory or GGUF file (nothing is downloaded)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a model directory or a .gguf file (from its metadata); FileNotFoundError
    when there is none."""
    path = Path(path)
    from kvserve.models.gguf.reader import is_gguf_path

    if is_gguf_path(path):
        from kvserve.models.gguf.checkpoint import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    has_files = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if not has_files:
        raise FileNotFoundError(
            f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json+merges.txt)"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def generation_eos_ids(model_dir: str | Path, config_eos: tuple[int, ...], tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer."""
    ids: set[int] = set()
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    if not ids:
        ids.update(config_eos)
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
