"""A Hugging Face fast tokenizer from a GGUF file's metadata.

A GGUF carries its vocabulary, merges, token types, special-token ids and chat template as
metadata.  We read them with the `gguf` package (gguf/reader.py, already open for the config)
into the dict transformers' GGUF converter takes, and let transformers build the tokenizer
(`convert_gguf_tokenizer`: byte-level BPE, SentencePiece, ... with the pre-tokenizer llama.cpp
names in `tokenizer.ggml.pre`).  This is the same builder `AutoTokenizer.from_pretrained(dir,
gguf_file=...)` uses, minus its second (slow, ~5-10 s here) parse of the whole file for a config;
tests/parity/test_gguf_smollm2.py holds the two equal.
"""
from __future__ import annotations

from typing import Any

from kvserve.models.gguf.reader import GGUFFile

# llama.cpp key (after "tokenizer.") -> transformers' name; as transformers' GGUF_TOKENIZER_MAPPING.
_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type",
    "ggml.pre": "pre_tokenizer_type",
    "ggml.tokens": "tokens",
    "ggml.scores": "scores",
    "ggml.token_type": "token_type",
    "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap",
    "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id",
    "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id",
    "ggml.add_space_prefix": "add_prefix_space",
}
_CONFIG_KEYS = {
    "chat_template": "chat_template",
    "ggml.add_bos_token": "add_bos_token",
    "ggml.add_eos_token": "add_eos_token",
}
_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unk_token_id",
            "pad_token": "pad_token_id"}


def has_tokenizer(gf: GGUFFile) -> bool:
    return gf.has("tokenizer.ggml.tokens") or gf.has("tokenizer.huggingface.json")


def tokenizer_inputs(gf: GGUFFile) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_dict for convert_gguf_tokenizer, tokenizer kwargs: chat template, specials, add_bos)."""
    tok = {name: gf.metadata(f"tokenizer.{key}") for key, name in _TOKENIZER_KEYS.items()
           if gf.has(f"tokenizer.{key}")}
    kwargs = {name: gf.metadata(f"tokenizer.{key}") for key, name in _CONFIG_KEYS.items()
              if gf.has(f"tokenizer.{key}")}
    if tok.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
        # (transformers' get_gguf_tokenizer does the same).
        kwargs.setdefault("add_bos_token", True)
    tokens = tok.get("tokens") or []
    for name, key in _SPECIAL.items():
        idx = tok.get(key)
        kwargs[name] = tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None
    return tok, kwargs


def _converter() -> Any:
    try:  # transformers >= 5
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import convert_gguf_tokenizer
    return convert_gguf_tokenizer


def build_tokenizer(gf: GGUFFile) -> Any:
    """The tokenizer the file describes; FileNotFoundError if it has none (as a directory
    without tokenizer files: the engine then serves token ids only)."""
    from transformers import PreTrainedTokenizerFast

    if not has_tokenizer(gf):
        raise FileNotFoundError(f"{gf.path}: the GGUF file has no tokenizer metadata (tokenizer.ggml.tokens)")
    tok, kwargs = tokenizer_inputs(gf)
    embedded = gf.metadata("tokenizer.huggingface.json")
    if embedded:  # the converter's own tokenizer.json, stored verbatim
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(embedded)
    else:
        try:
            backend, extra = _converter()(gf.architecture, tok)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{gf.path}: cannot build its tokenizer "
                             f"(tokenizer.ggml.model {tok.get('tokenizer_type')!r}): {exc}") from None
        kwargs.update(extra or {})
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
