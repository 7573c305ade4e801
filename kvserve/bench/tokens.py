"""Synthetic prompts: token ids of an exact length, or text that tokenizes to an exact length.

Two renderers share one interface, `render(ids) -> (prompt, prompt_len)`:

* `IdsRenderer`: the prompt *is* the token-id list (the OpenAI completions API accepts
  `prompt: list[int]`).  Exact by construction.
* `TextRenderer`: ids are drawn from "word tokens" (a leading-space marker plus ASCII letters,
  e.g. GPT-2 `Ġhello` or SentencePiece `▁hello`) that each re-encode to themselves.  The
  pre-tokenizer splits text at spaces, so a string of such words re-encodes to exactly the ids it
  was decoded from; prefix sharing between prompts (Mooncake blocks) survives the round trip.  The
  renderer checks the round trip and, if a tokenizer breaks it, repairs the text until it encodes to
  the intended length (then only the length, not the exact ids, is guaranteed).

Lengths count the tokens of `encode(text, add_special_tokens=False)`; a server that prepends BOS
sees one more.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kvserve.bench.errors import BenchInputError

# A word token: a leading-space marker (byte-level BPE "Ġ", SentencePiece "▁") and 2+ ASCII letters.
_WORD_TOKEN = re.compile(r"^[\u0120\u2581][A-Za-z]{2,}$")
_MAX_REPAIRS = 16


def load_tokenizer(path: str | Path) -> Any:
    """Load a local Hugging Face tokenizer directory, a .gguf file's tokenizer or a built-in
    model's (`smollm2-135m-instruct`); nothing is downloaded."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf" or (not p.exists() and str(path).lower() in _builtin_names()):
        from kvserve.engine.tokenizer import load_tokenizer as load_model_tokenizer
        from kvserve.models.builtin import resolve_model

        try:
            return load_model_tokenizer(resolve_model(str(path))[0])
        except (FileNotFoundError, ValueError) as exc:
            raise BenchInputError(f"{path}: {exc}") from None
    if not p.exists():
        raise BenchInputError(f"{p}: tokenizer directory not found")
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # transformers raises many types; report one clear line
        raise BenchInputError(f"{p}: cannot load a tokenizer from this directory: {exc}") from None


def _builtin_names() -> tuple[str, ...]:
    from kvserve.models.builtin import BUILTIN_MODELS

    return tuple(BUILTIN_MODELS)


def tokenizer_vocab_size(tokenizer: Any) -> int:
    return int(len(tokenizer))


class Renderer(Protocol):
    """Turns sampled token ids into the prompt that is sent."""

    pool: np.ndarray  # [pool_size] int64: the ids prompts are drawn from

    def render(self, ids: list[int]) -> tuple[list[int] | str, int]: ...


@dataclass(slots=True)
class IdsRenderer:
    """Prompts sent as token ids drawn from `[low, vocab_size)` minus `exclude`."""

    vocab_size: int
    exclude: frozenset[int] = frozenset()
    low: int = 0
    pool: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.vocab_size <= self.low:
            raise BenchInputError(f"--vocab-size must exceed {self.low}, got {self.vocab_size}")
        ids = np.arange(self.low, self.vocab_size, dtype=np.int64)
        if self.exclude:
            ids = ids[~np.isin(ids, np.fromiter(self.exclude, dtype=np.int64))]
        self.pool = ids

    def render(self, ids: list[int]) -> tuple[list[int] | str, int]:
        return list(ids), len(ids)


@dataclass(slots=True)
class TextRenderer:
    """Prompts sent as text that encodes (without special tokens) to the intended length."""

    tokenizer: Any
    pool: np.ndarray = field(init=False)
    repaired: int = 0  # prompts whose ids changed in the round trip (length still exact)

    def __post_init__(self) -> None:
        self.pool = word_token_pool(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def render(self, ids: list[int]) -> tuple[list[int] | str, int]:
        target = len(ids)
        text = self.tokenizer.decode(ids)
        enc = self.encode(text)
        if enc == list(ids):
            return text, target
        self.repaired += 1
        return self._repair(ids, target)

    def _repair(self, ids: list[int], target: int) -> tuple[str, int]:
        # Converge on the target length: trim when re-encoding grew, pad with pool tokens when it
        # shrank.  Each pass re-encodes the decoded text, so the final check is on real text.
        rng = np.random.default_rng(target)
        current = list(ids)
        for _ in range(_MAX_REPAIRS):
            text = self.tokenizer.decode(current)
            enc = self.encode(text)
            if len(enc) == target:
                return text, target
            if len(enc) > target:
                current = enc[:target]
            else:
                current = enc + rng.choice(self.pool, target - len(enc)).tolist()
        raise RuntimeError(f"could not build text that encodes to {target} tokens with this tokenizer")


def word_token_pool(tokenizer: Any) -> np.ndarray:
    """Ids of word tokens that re-encode to themselves (see module docstring)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab: dict[str, int] = tokenizer.get_vocab()
    candidates = sorted(i for t, i in vocab.items() if _WORD_TOKEN.match(t) and i not in special)
    pool: list[int] = []
    if candidates:
        backend = getattr(tokenizer, "backend_tokenizer", None)  # fast (Rust) tokenizers
        if backend is not None:
            # Batched calls on the Rust tokenizer: several times faster than the Python wrapper.
            texts = backend.decode_batch([[i] for i in candidates])
            encoded = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            texts = [tokenizer.decode([i]) for i in candidates]
            encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        pool = [i for i, enc in zip(candidates, encoded) if list(enc) == [i]]
    if len(pool) < 100:
        # Unusual tokenizer (no marker-prefixed words): fall back to all non-special ids and let
        # TextRenderer's repair loop guarantee the length.
        pool = [i for i in range(len(tokenizer)) if i not in special]
    return np.asarray(pool, dtype=np.int64)


def random_ids(pool: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """`n` ids drawn uniformly from `pool`."""
    return pool[rng.integers(0, len(pool), size=n)].tolist()


def block_ids(pool: np.ndarray, hash_id: int, block_size: int, seed: int) -> list[int]:
    """The tokens of one prefix block: a pure function of (seed, hash_id), so equal hash ids give
    identical blocks in every request and distinct ids give (with overwhelming probability,
    ~|pool|^-block_size) distinct blocks."""
    if hash_id < 0:
        raise BenchInputError(f"hash ids must be non-negative, got {hash_id}")
    rng = np.random.default_rng([seed, hash_id])
    return pool[rng.integers(0, len(pool), size=block_size)].tolist()


def prefix_block_prompt(
    pool: np.ndarray,
    hash_ids: tuple[int, ...],
    input_len: int,
    block_size: int,
    seed: int,
    fill_rng: np.random.Generator,
) -> list[int]:
    """Token ids for a request with Mooncake `hash_ids`.

    Block j of the prompt is `block_ids(hash_ids[j])`; the prompt is truncated to `input_len`, so
    the last block may be partial (a prefix of the full block).  Invariant: two prompts whose
    hash_ids share k leading ids share exactly their first k blocks.  If `input_len` exceeds
    `len(hash_ids) * block_size` the tail is filled with request-private random tokens."""
    out: list[int] = []
    for h in hash_ids:
        if len(out) >= input_len:
            break
        out.extend(block_ids(pool, h, block_size, seed))
    if len(out) < input_len:
        out.extend(random_ids(pool, input_len - len(out), fill_rng))
    return out[:input_len]
