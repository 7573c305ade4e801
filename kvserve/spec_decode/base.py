"""The proposer interface: draft tokens for speculative decoding.

A proposer guesses the next few tokens of a request; the target model then
scores all of them in one forward pass and the verifier
(kvserve.spec_decode.rejection) keeps the longest prefix it agrees with plus
one token of its own.  Proposals only change speed, never outputs.

Per request the engine holds one `ProposerState`, made by `Proposer.new_state`
from the prompt.  After every step it appends the tokens that step
*committed* (accepted drafts + the bonus/correction token); rejected drafts
are never appended, so a proposer's incremental index only ever sees the
request's real token sequence.  Preemption by recompute keeps the state (the
tokens do not change); a request forked for `n > 1` gets a fresh state built
from its tokens so far (`new_state(tokens, num_prompt_tokens=...)`).

This module and the n-gram / suffix proposers import no torch, so the
scheduler side (pure Python) can call them.
"""
from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from typing import ClassVar, Optional, Sequence


class ProposerState(ABC):
    """One request's tokens (prompt + committed output) and the proposer's index over them."""

    def __init__(self, num_prompt_tokens: int) -> None:
        self.token_ids: list[int] = []  # prompt + committed output; append-only
        self.num_prompt_tokens = num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @abstractmethod
    def append(self, token_ids: Sequence[int]) -> None:
        """Commit tokens (accepted drafts + the verifier's own token), updating the index."""


class Proposer(ABC):
    """Proposes up to k draft tokens per request from its `ProposerState`."""

    name: ClassVar[str] = "abstract"
    # True: proposing costs next to nothing (lookups), so the engine proposes the most it
    # may and lets the length policy cut; False (a draft model): the policy decides k first.
    proposes_for_free: ClassVar[bool] = True

    @abstractmethod
    def new_state(self, prompt_token_ids: Sequence[int],
                  num_prompt_tokens: Optional[int] = None) -> ProposerState:
        """A state holding `prompt_token_ids` (all of them are the prompt unless
        `num_prompt_tokens` says fewer: a forked request resumes mid-output)."""

    @abstractmethod
    def propose(self, state: ProposerState, k: int) -> list[int]:
        """Up to `k` draft tokens that would follow `state.token_ids` (fewer, or none,
        when the proposer has no good guess).  Does not change what is committed."""

    def propose_batch(self, states: Sequence[ProposerState], ks: Sequence[int]) -> list[list[int]]:
        """One proposal per state; a proposer that can batch (a draft model) overrides this."""
        if len(states) != len(ks):
            raise ValueError(f"{len(states)} states but {len(ks)} lengths")
        return [self.propose(s, k) for s, k in zip(states, ks)]

    def release_cache(self, state: ProposerState) -> None:
        """The request was preempted: free what the state caches that can be recomputed
        from its tokens (a draft model's KV); the state itself stays."""

    def finish(self, state: ProposerState) -> None:
        """The request finished (or was aborted): release what the state holds.
        Proposers that learn across requests (the suffix proposer's global tree)
        take the request's output here."""


def check_k(k: int) -> int:
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"number of speculative tokens must be an integer >= 0, got {k!r}")
    return k


def check_tokens(token_ids: Sequence[int]) -> list[int]:
    """A plain list of ints (NumPy integers accepted); a negative or non-integer id is a ValueError."""
    try:
        out = [operator.index(t) for t in token_ids]
    except TypeError:
        raise ValueError(f"token ids must be integers, got {list(token_ids)[:8]!r}") from None
    if out and min(out) < 0:
        raise ValueError(f"token ids must be non-negative, got {min(out)}")
    return out
