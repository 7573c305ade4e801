"""The speculative-decoding flags of `kvserve serve` and `kvserve bench offline`.

    --speculative-method ngram|suffix|draft:PATH   (default: off)
    --num-speculative-tokens K                     (default: 4; the most drafts per request per step)
    --speculative-adaptive / --no-speculative-adaptive   (default: on)
"""
from __future__ import annotations

import argparse
from typing import Any

from kvserve.spec_decode.config import MAX_SPECULATIVE_TOKENS, check_method


def _method(text: str) -> str:
    try:
        return check_method(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _num_tokens(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {text!r}")
    return k


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (docs/spec_decode.md)")
    g.add_argument("--speculative-method", type=_method, default=None, metavar="ngram|suffix|draft:PATH",
                   help="propose draft tokens that the model verifies in one step: ngram = prompt lookup "
                        "(the last n tokens matched in prompt and output), suffix = suffix decoding over the "
                        "request and recent outputs, draft:PATH = a small model with the same tokenizer; "
                        "greedy outputs are unchanged, sampled ones keep their distribution (default: off)")
    g.add_argument("--num-speculative-tokens", type=_num_tokens, default=4, metavar="K",
                   help="the most draft tokens per request per step (default: %(default)s)")
    g.add_argument("--speculative-adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="choose the number of drafts per request per step from measured acceptance and step "
                        "times, speculating less (or not at all) at high load; --no-speculative-adaptive "
                        "always drafts up to K (default: on)")


def speculative_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """LLM / LLMEngine keyword arguments of the flags (none when speculation is off)."""
    if getattr(args, "speculative_method", None) is None:  # off, or a namespace built without the flags
        return {}
    return dict(speculative_method=args.speculative_method, num_speculative_tokens=args.num_speculative_tokens,
                speculative_adaptive=args.speculative_adaptive)
