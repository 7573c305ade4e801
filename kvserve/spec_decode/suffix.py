"""Suffix decoding (Oliaro et al., 2024, "SuffixDecoding"): speculate from suffix trees.

Two trees:
- a per-request tree over the request's prompt and output so far, updated
  as tokens are committed (catches copying from the prompt and repetition
  inside the output, like n-gram lookup, but with frequencies):
  kvserve.spec_decode.suffix_index.CompactSuffixIndex, about one node per
  token of novel text;
- optionally a global tree over the outputs of recently finished requests,
  bounded to `global_max_tokens` tokens: the oldest request's output is
  uncounted when the window is full (agentic and templated workloads
  repeat earlier answers): kvserve.spec_decode.suffix_tree.SuffixTrie, which
  supports removal (max_depth nodes per token, bounded by the window).

A proposal matches the longest suffix of the request's tokens (between
`min_match` and `max_match` long) that occurs earlier with a continuation,
then follows the most frequent child while the path probability stays
>= `min_prob`, for at most `max_spec_factor * match_length` tokens (short
matches are weak evidence).  Each tree proposes; the one with the higher
score (sum of path probabilities = expected accepted tokens under the counts)
wins, the request's own tree on ties.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional, Sequence

from kvserve.spec_decode.base import Proposer, ProposerState, check_k, check_tokens
from kvserve.spec_decode.suffix_index import CompactSuffixIndex
from kvserve.spec_decode.suffix_tree import SequenceCursor, SuffixTrie, longest_match


class SuffixState(ProposerState):
    def __init__(self, max_depth: int, num_prompt_tokens: int) -> None:
        super().__init__(num_prompt_tokens)
        # Over this request's prompt + output; it holds the token list itself.
        self.index = CompactSuffixIndex(max_depth)
        self.token_ids = self.index.tokens

    def append(self, token_ids: Sequence[int]) -> None:
        self.index.extend(check_tokens(token_ids))


class SuffixProposer(Proposer):
    name = "suffix"

    def __init__(self, max_depth: int = 24, min_match: int = 1, max_match: int = 16,
                 min_prob: float = 0.1, max_spec_factor: float = 1.0,
                 global_max_tokens: int = 0) -> None:
        if not (isinstance(min_match, int) and isinstance(max_match, int) and 1 <= min_match <= max_match):
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match!r}, {max_match!r}")
        if not isinstance(max_depth, int) or max_depth <= max_match:
            raise ValueError(f"max_depth ({max_depth!r}) must exceed max_match ({max_match}): "
                             "a match needs room below it for the continuation")
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {min_prob!r}")
        if not max_spec_factor > 0:
            raise ValueError(f"max_spec_factor must be > 0, got {max_spec_factor!r}")
        if not isinstance(global_max_tokens, int) or global_max_tokens < 0:
            raise ValueError(f"global_max_tokens must be an integer >= 0, got {global_max_tokens!r}")
        self.max_depth = max_depth
        self.min_match = min_match
        self.max_match = max_match
        self.min_prob = min_prob
        self.max_spec_factor = max_spec_factor
        self.global_max_tokens = global_max_tokens
        self.global_tree: Optional[SuffixTrie] = SuffixTrie(max_depth) if global_max_tokens else None
        self._window: deque[list[int]] = deque()  # outputs in the global tree, oldest first
        self._window_tokens = 0

    def new_state(self, prompt_token_ids: Sequence[int],
                  num_prompt_tokens: Optional[int] = None) -> SuffixState:
        ids = check_tokens(prompt_token_ids)
        state = SuffixState(self.max_depth, len(ids) if num_prompt_tokens is None else num_prompt_tokens)
        state.append(ids)
        return state

    def propose(self, state: ProposerState, k: int) -> list[int]:
        check_k(k)
        if not isinstance(state, SuffixState):
            raise TypeError(f"SuffixProposer got a {type(state).__name__}")
        if k == 0:
            return []
        index = state.index
        node, m = index.match(self.min_match, self.max_match)
        tokens, score = index.continuation(node, m, self._limit(k, m), self.min_prob) if m else ([], 0.0)
        if self.global_tree is not None and self._window:
            g_node, g_m = longest_match(self.global_tree, state.token_ids, self.min_match, self.max_match)
            if g_m:
                g_tokens, g_score = self.global_tree.continuation(g_node, g_m, self._limit(k, g_m), self.min_prob)
                if g_score > score:
                    tokens = g_tokens
        return tokens

    def _limit(self, k: int, match_len: int) -> int:
        return min(k, max(1, math.floor(self.max_spec_factor * match_len)))

    def finish(self, state: ProposerState) -> None:
        """Add the finished request's output to the global tree (evicting the oldest outputs)."""
        if self.global_tree is None or not isinstance(state, SuffixState):
            return
        out = state.output_token_ids[-self.global_max_tokens:]
        if not out:
            return
        self.global_tree.extend(SequenceCursor(), out)
        self._window.append(out)
        self._window_tokens += len(out)
        while self._window_tokens > self.global_max_tokens:
            old = self._window.popleft()
            self.global_tree.remove(old)
            self._window_tokens -= len(old)

    @property
    def global_window_tokens(self) -> int:
        return self._window_tokens
