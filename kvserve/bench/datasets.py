"""Workloads: a list of `BenchRequest`s (prompt, its token count, output length, trace timestamp).

Datasets:
  random      input/output lengths from distributions (`LengthDist`), synthetic prompts
  sharegpt    real first-turn prompts (a JSON array of {"conversations": [{"from", "value"}]}),
              as text, token ids, or through the model's chat template ("chat")
  azure-conv, azure-code, burstgpt, mooncake, trace
              lengths (and timestamps) from a trace; synthetic prompts of those lengths;
              Mooncake hash_ids become shared prefix blocks (tokens.prefix_block_prompt)

Everything is a pure function of the seed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvserve.bench.errors import BenchInputError
from kvserve.bench.tokens import Renderer, prefix_block_prompt, random_ids
from kvserve.bench.traces import TraceRecord


@dataclass(slots=True)
class BenchRequest:
    index: int
    prompt: list[int] | str  # token ids, or text that encodes to prompt_len tokens
    prompt_len: int
    output_len: int  # sent as max_tokens with ignore_eos, so the server generates exactly this
    timestamp_s: float | None = None  # trace arrival (seconds since the trace start)
    hash_ids: tuple[int, ...] = ()
    body: dict[str, Any] | None = None  # extra body fields of this request (tenant, SLO: bench/tenants.py)


# ----------------------------------------------------------------------------- length distributions


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A distribution over token counts, written `N` (fixed), `uniform:LO:HI` (inclusive),
    `normal:MEAN:STD`, `lognormal:MEDIAN:SIGMA` or `exponential:MEAN`.  Samples are rounded and
    clamped to [1, max_len] (max_len only if given)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        parts = spec.strip().split(":")
        try:
            nums = [float(x) for x in parts[1:]] if len(parts) > 1 else [float(parts[0])]
        except ValueError:
            raise BenchInputError(f"bad length distribution {spec!r}: {_DIST_HELP}") from None
        kind = parts[0].lower() if len(parts) > 1 else "fixed"
        arity = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2, "exponential": 1}
        if kind not in arity or len(nums) != arity[kind]:
            raise BenchInputError(f"bad length distribution {spec!r}: {_DIST_HELP}")
        if any(not math.isfinite(x) for x in nums):
            raise BenchInputError(f"bad length distribution {spec!r}: numbers must be finite")
        dist = cls(kind, nums[0], nums[1] if len(nums) > 1 else 0.0)
        if kind in ("fixed", "exponential", "lognormal") and dist.a < 1:
            raise BenchInputError(f"bad length distribution {spec!r}: the length must be >= 1")
        if kind == "uniform" and not (1 <= dist.a <= dist.b):
            raise BenchInputError(f"bad length distribution {spec!r}: need 1 <= LO <= HI")
        if kind in ("normal", "lognormal") and dist.b < 0:
            raise BenchInputError(f"bad length distribution {spec!r}: the spread must be >= 0")
        return dist

    def sample(self, rng: np.random.Generator, n: int, max_len: int | None = None) -> np.ndarray:
        if self.kind == "fixed":
            x = np.full(n, self.a)
        elif self.kind == "uniform":
            x = rng.integers(int(self.a), int(self.b) + 1, size=n).astype(float)
        elif self.kind == "normal":
            x = rng.normal(self.a, self.b, size=n)
        elif self.kind == "lognormal":
            x = rng.lognormal(math.log(self.a), self.b, size=n)
        else:  # exponential
            x = rng.exponential(self.a, size=n)
        out = np.maximum(np.rint(x), 1).astype(np.int64)
        return np.minimum(out, max_len) if max_len is not None else out


_DIST_HELP = "use N, uniform:LO:HI, normal:MEAN:STD, lognormal:MEDIAN:SIGMA or exponential:MEAN"


# ----------------------------------------------------------------------------- builders


def random_requests(
    num: int, input_dist: LengthDist, output_dist: LengthDist, renderer: Renderer, seed: int
) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    in_lens = input_dist.sample(rng, num)
    out_lens = output_dist.sample(rng, num)
    out: list[BenchRequest] = []
    for i in range(num):
        prompt, plen = renderer.render(random_ids(renderer.pool, int(in_lens[i]), rng))
        out.append(BenchRequest(i, prompt, plen, int(out_lens[i])))
    return out


def load_sharegpt(path: str | Path) -> list[str]:
    """First-turn human prompts from a ShareGPT-style JSON array."""
    path = Path(path)
    if not path.is_file():
        raise BenchInputError(f"{path}: ShareGPT file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BenchInputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise BenchInputError(f"{path}: expected a JSON array of conversations")
    prompts: list[str] = []
    for k, item in enumerate(data):
        conv = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(conv, list) or not conv or not isinstance(conv[0], dict):
            raise BenchInputError(f"{path}: entry {k} has no 'conversations' list")
        text = conv[0].get("value")
        if not isinstance(text, str):
            raise BenchInputError(f"{path}: entry {k}: the first turn has no string 'value'")
        if text.strip():
            prompts.append(text)
    if not prompts:
        raise BenchInputError(f"{path}: no prompts found")
    return prompts


def sharegpt_requests(
    path: str | Path,
    num: int,
    tokenizer: Any,
    output_dist: LengthDist,
    prompt_format: str,
    seed: int,
    max_input_len: int | None = None,
) -> list[BenchRequest]:
    """`num` prompts drawn (seeded shuffle, without replacement while they last) from the file.

    The file has no responses, so output lengths come from `output_dist`.  `prompt_format`
    "chat": each prompt is one user turn through the tokenizer's chat template (with the
    generation prompt), sent as token ids: what /v1/chat/completions would run."""
    prompts = load_sharegpt(path)
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise BenchInputError("--prompt-format chat needs a tokenizer with a chat template")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(prompts))
    out: list[BenchRequest] = []
    for k in range(num):
        text = prompts[int(order[k % len(order)])]
        if prompt_format == "chat":
            from kvserve.eval.real_prompts import chat_prompt_ids

            ids = chat_prompt_ids(tokenizer, text, max_input_len or 1 << 30)
            out.append(BenchRequest(k, ids, len(ids), int(output_dist.sample(rng, 1)[0])))
            continue
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if max_input_len is not None and len(ids) > max_input_len:
            ids = ids[:max_input_len]
            text = tokenizer.decode(ids)
            ids = list(tokenizer.encode(text, add_special_tokens=False))
        olen = int(output_dist.sample(rng, 1)[0])
        prompt: list[int] | str = ids if prompt_format == "ids" else text
        out.append(BenchRequest(k, prompt, len(ids), olen))
    return out


def trace_requests(
    records: list[TraceRecord],
    num: int | None,
    renderer: Renderer,
    seed: int,
    block_size: int = 512,
    source: str = "trace",
) -> tuple[list[BenchRequest], int]:
    """The first `num` usable trace records as requests (order, and so timestamps, preserved).

    Rows with 0 input or 0 output tokens (failed requests in BurstGPT) cannot be replayed and are
    skipped; the count of skipped rows is returned so the caller can say so.  Records with
    `hash_ids` get prompts whose shared leading ids become shared prefix blocks of `block_size`
    tokens."""
    if block_size < 1:
        raise BenchInputError(f"--block-size must be >= 1, got {block_size}")
    out: list[BenchRequest] = []
    skipped = 0
    for rec in records:
        if num is not None and len(out) >= num:
            break
        if rec.input_len < 1 or rec.output_len < 1:
            skipped += 1
            continue
        fill = np.random.default_rng([seed, 1 << 20, rec.line])  # request-private tokens
        if rec.hash_ids:
            ids = prefix_block_prompt(renderer.pool, rec.hash_ids, rec.input_len, block_size, seed, fill)
        else:
            ids = random_ids(renderer.pool, rec.input_len, fill)
        prompt, plen = renderer.render(ids)
        out.append(BenchRequest(len(out), prompt, plen, rec.output_len, rec.timestamp_s, rec.hash_ids))
    if not out:
        raise BenchInputError(f"{source}: no usable requests (all {skipped} rows had 0 input or output tokens)")
    return out, skipped
