"""SpecDecodeManager: the scheduler-side glue the engine core will hold (pure Python).

One object per engine: the proposer, one ProposerState per request, the
speculation-length policy and the metrics.  Per step the scheduler calls
`drafts(candidates, base_tokens)` for its running decodes and schedules each
request's k drafts as k + 1 positions; after the step it calls `commit` with
what the verifier emitted.  See docs/spec_decode.md, section 5.
"""
from __future__ import annotations

from typing import Optional, Sequence

from kvserve.spec_decode.adaptive import SpecLengthPolicy
from kvserve.spec_decode.base import Proposer, ProposerState
from kvserve.spec_decode.metrics import SpecDecodeMetrics


class SpecDecodeManager:
    def __init__(self, proposer: Proposer, policy: SpecLengthPolicy) -> None:
        self.proposer = proposer
        self.policy = policy
        self.metrics = SpecDecodeMetrics()
        self._states: dict[str, ProposerState] = {}

    def add(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: Optional[int] = None) -> None:
        """A new request (its prompt), or a sample forked mid-output (all its tokens so far)."""
        if request_id in self._states:
            raise ValueError(f"request {request_id!r} is already tracked")
        self._states[request_id] = self.proposer.new_state(token_ids, num_prompt_tokens)

    def drafts(self, candidates: Sequence[tuple[str, int]], base_tokens: int = 0,
               jointly: bool = False, weights: Optional[Sequence[float]] = None) -> dict[str, list[int]]:
        """Draft tokens per candidate (request id, most drafts it may take this step: the
        configured K, tokens left before max_tokens / max_model_len).  Requests given none
        are absent.  jointly: one length for all candidates; weights: the value of one token of
        each candidate (SpecLengthPolicy.choose).  Cheap proposers propose first and the
        policy cuts the proposals; a draft model is asked only for the k the policy chose."""
        states = [self._states[rid] for rid, _ in candidates]
        if self.proposer.proposes_for_free:
            proposals = self.proposer.propose_batch(states, [min(cap, self.policy.max_k) for _, cap in candidates])
            ks = self.policy.choose([(rid, len(p)) for (rid, _), p in zip(candidates, proposals)], base_tokens,
                                    jointly, weights)
            chosen = [p[:k] for p, k in zip(proposals, ks)]
        else:
            ks = self.policy.choose(candidates, base_tokens, jointly, weights)
            chosen = self.proposer.propose_batch(states, ks)
        return {rid: d for (rid, _), d in zip(candidates, chosen) if d}

    def sync(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int) -> None:
        """Make the request's state hold `token_ids` (its committed tokens, which only grow):
        a new state for a request not seen yet (or a forked sample), else append the tail it
        has not seen.  The engine calls this before proposing instead of `commit`, so the
        state follows the request whatever finished the tokens (stop rules, forks)."""
        state = self._states.get(request_id)
        if state is None:
            self._states[request_id] = self.proposer.new_state(token_ids, num_prompt_tokens)
        elif state.num_tokens < len(token_ids):
            state.append(token_ids[state.num_tokens:])

    def observe(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        """A verification's outcome: metrics and the length policy's acceptance estimates."""
        self.metrics.observe(num_drafted, num_accepted)
        self.policy.observe(request_id, num_drafted, num_accepted)

    def commit(self, request_id: str, token_ids: Sequence[int], num_drafted: int, num_accepted: int) -> None:
        """After the step: the tokens it emitted for the request (accepted drafts, then the
        bonus/correction token; or the one sampled token of a step without drafts)."""
        if num_drafted and len(token_ids) > num_accepted + 1:
            raise ValueError(f"{request_id}: {len(token_ids)} tokens for {num_accepted} accepted drafts")
        self._states[request_id].append(token_ids)
        self.metrics.observe(num_drafted, num_accepted)
        self.policy.observe(request_id, num_drafted, num_accepted)

    def preempted(self, request_id: str) -> None:
        """Preempted (its KV freed): the proposer frees what it caches for it (a draft
        model's KV), keeping the state; the request resumes with the same tokens."""
        state = self._states.get(request_id)
        if state is not None:
            self.proposer.release_cache(state)

    def finish(self, request_id: str) -> None:
        """Finished or aborted: release the state (the suffix proposer learns its output here)."""
        state = self._states.pop(request_id, None)
        if state is not None:
            self.proposer.finish(state)
        self.policy.remove(request_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)
