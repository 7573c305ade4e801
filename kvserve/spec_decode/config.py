"""SpeculativeConfig: the engine's speculative-decoding settings (plain data, no torch).

    --speculative-method ngram|suffix|draft:PATH    which proposer (none: off)
    --num-speculative-tokens K                      the most drafts per request per step
    --speculative-adaptive / --no-...               choose k per request per step (default on)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

METHOD_CHOICES = ("ngram", "suffix", "draft:PATH")
MAX_SPECULATIVE_TOKENS = 16  # more drafts than this are never worth verifying


def check_method(method: str) -> str:
    """The method, or a ValueError naming the choices."""
    if method in ("ngram", "suffix") or (method.startswith("draft:") and len(method) > len("draft:")):
        return method
    raise ValueError(f"speculative method must be one of {', '.join(METHOD_CHOICES)} (PATH: a draft model "
                     f"directory with the target's tokenizer), got {method!r}")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: Optional[str] = None  # None: no speculation
    num_speculative_tokens: int = 4
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method is not None:
            check_method(self.method)
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")

    @property
    def enabled(self) -> bool:
        return self.method is not None

    @property
    def draft_model(self) -> Optional[str]:
        """The draft model directory of `draft:PATH`, else None."""
        if self.method is not None and self.method.startswith("draft:"):
            return self.method[len("draft:"):]
        return None
