"""Draft-model proposer: a small model with the target's tokenizer guesses the next k tokens.

Reference implementation: the draft runs through kvserve's own model code
(kvserve/models/llama.py + loader) on a dense per-request KV cache
(kvserve.spec_decode.dense_runner), greedily, one request at a time.  The
engine runs the draft batched on its own paged KV pool
(kvserve.spec_decode.paged_draft.PagedDraftProposer); this class fixes the
interface and the semantics that implementation is tested equal to
(tests/unit/spec_decode/test_paged_draft.py, test_engine_draft.py):

- the draft's cache holds the request's committed tokens plus the drafts it
  last proposed; proposing again keeps the cached prefix that still agrees
  with the committed tokens (accepted drafts) and drops the rest (rejected
  drafts' KV), then catches up on the committed tokens it has not seen
  (the bonus/correction token) before drafting;
- greedy drafts are deterministic, so the verifier treats them as one-hot
  draft distributions (kvserve.spec_decode.rejection) and sampled target
  outputs keep their distribution exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from kvserve.spec_decode.base import Proposer, ProposerState, check_k, check_tokens
from kvserve.spec_decode.dense_runner import DenseModelRunner, DenseSequence


class DraftState(ProposerState):
    def __init__(self, seq: DenseSequence, num_prompt_tokens: int) -> None:
        super().__init__(num_prompt_tokens)
        self.seq = seq  # the draft's KV: committed tokens, then possibly stale drafts

    def append(self, token_ids: Sequence[int]) -> None:
        self.token_ids.extend(check_tokens(token_ids))


class DraftModelProposer(Proposer):
    name = "draft"
    proposes_for_free = False

    def __init__(self, runner: DenseModelRunner, target_vocab_size: Optional[int] = None) -> None:
        if target_vocab_size is not None and runner.vocab_size > target_vocab_size:
            raise ValueError(f"draft vocabulary ({runner.vocab_size}) is larger than the target's "
                             f"({target_vocab_size}): the draft could propose ids the target does not have")
        self.runner = runner

    @classmethod
    def load(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
             target_vocab_size: Optional[int] = None) -> "DraftModelProposer":
        return cls(DenseModelRunner.load(model_dir, dtype, device), target_vocab_size)

    def new_state(self, prompt_token_ids: Sequence[int],
                  num_prompt_tokens: Optional[int] = None) -> DraftState:
        ids = check_tokens(prompt_token_ids)
        state = DraftState(self.runner.new_sequence(capacity=len(ids) + 64),
                           len(ids) if num_prompt_tokens is None else num_prompt_tokens)
        state.token_ids.extend(ids)
        return state

    def propose(self, state: ProposerState, k: int) -> list[int]:
        check_k(k)
        if not isinstance(state, DraftState):
            raise TypeError(f"DraftModelProposer got a {type(state).__name__}")
        tokens = state.token_ids
        if k == 0 or not tokens:
            return []
        # Leave room in the draft's positions: position len(tokens) + k - 2 is the last fed.
        k = min(k, self.runner.max_positions - len(tokens) + 1)
        if k <= 0:
            return []
        # Roll back to the agreeing prefix, catch up, and take the last position's logits.
        logits = self.runner.ensure(state.seq, tokens, logits_from=len(tokens) - 1)
        out = [int(logits[-1].argmax())]
        while len(out) < k:
            logits = self.runner.extend(state.seq, out[-1:])
            out.append(int(logits[-1].argmax()))
        return out

    def finish(self, state: ProposerState) -> None:
        if isinstance(state, DraftState):
            state.seq = self.runner.new_sequence(capacity=1)  # drop the KV now, not at GC
