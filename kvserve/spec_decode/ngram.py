"""N-gram prompt lookup: propose what followed the last n tokens when they last occurred.

For n from `max_n` down to `min_n`, the last n tokens of prompt + output are
looked up among the earlier n-grams of the same sequence; at the first n that
matches, the tokens that followed its most recent earlier occurrence are the
proposal.  Editing, summarising and code tasks copy long spans of their input,
which this catches at no model cost.

Incremental index: per n, a dict from n-gram to the position right after its
most recent occurrence *that has a continuation* (so the sequence's own last
n tokens are never matched to themselves).  Appending one token adds one
entry per n, and a proposal is `max_n - min_n + 1` dict lookups: both cost
O(max_n^2), independent of the sequence length.  `ngram_propose_reference`
is the plain O(len * max_n) scan the index is tested equal to.

The proposal copies forward from the match and may run past the end of the
sequence into its own proposed tokens: after "a b c a b" the match of "a b"
at 0 proposes "c a b c a ...", i.e. periodic text continues its period.
"""
from __future__ import annotations

from typing import Optional, Sequence

from kvserve.spec_decode.base import Proposer, ProposerState, check_k, check_tokens


def _copy_from(tokens: Sequence[int], start: int, k: int) -> list[int]:
    """k tokens copied from `start` on, continuing into the copy itself past the end."""
    n = len(tokens)
    out: list[int] = []
    for j in range(k):
        pos = start + j
        out.append(tokens[pos] if pos < n else out[pos - n])
    return out


def ngram_propose_reference(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The definition, by direct scan (slow; the index below is tested equal to it)."""
    n_tok = len(tokens)
    if k == 0:
        return []
    for n in range(min(max_n, n_tok - 1), min_n - 1, -1):
        suffix = list(tokens[n_tok - n:])
        # Most recent earlier occurrence ending at e (exclusive), with a continuation at e < n_tok.
        for e in range(n_tok - 1, n - 1, -1):
            if list(tokens[e - n:e]) == suffix:
                return _copy_from(tokens, e, k)
    return []


class NgramState(ProposerState):
    def __init__(self, min_n: int, max_n: int, num_prompt_tokens: int) -> None:
        super().__init__(num_prompt_tokens)
        self.min_n = min_n
        self.max_n = max_n
        # _last_end[n - min_n]: n-gram -> e, the position after its latest occurrence
        # tokens[e - n:e] with e <= len(tokens) - 1 (a continuation token exists).
        self._last_end: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n - min_n + 1)]

    def append(self, token_ids: Sequence[int]) -> None:
        toks = self.token_ids
        for t in check_tokens(token_ids):
            toks.append(t)
            e = len(toks) - 1  # the n-grams ending at e now have the continuation toks[e]
            for n in range(self.min_n, min(self.max_n, e) + 1):
                self._last_end[n - self.min_n][tuple(toks[e - n:e])] = e

    def lookup(self, k: int) -> list[int]:
        toks = self.token_ids
        L = len(toks)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            e = self._last_end[n - self.min_n].get(tuple(toks[L - n:]))
            if e is not None:
                return _copy_from(toks, e, k)
        return []


class NgramProposer(Proposer):
    """Prompt lookup decoding (Saxena 2023; vLLM's `ngram` method)."""

    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not (isinstance(min_n, int) and isinstance(max_n, int) and 1 <= min_n <= max_n):
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got min_n={min_n!r}, max_n={max_n!r}")
        self.min_n = min_n
        self.max_n = max_n

    def new_state(self, prompt_token_ids: Sequence[int],
                  num_prompt_tokens: Optional[int] = None) -> NgramState:
        ids = check_tokens(prompt_token_ids)
        state = NgramState(self.min_n, self.max_n, len(ids) if num_prompt_tokens is None else num_prompt_tokens)
        state.append(ids)
        return state

    def propose(self, state: ProposerState, k: int) -> list[int]:
        check_k(k)
        if not isinstance(state, NgramState):
            raise TypeError(f"NgramProposer got a {type(state).__name__}")
        return state.lookup(k) if k else []
