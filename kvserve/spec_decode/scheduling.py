"""Speculation in the scheduler's step (pure Python; the scheduler holds one as `Scheduler.spec`).

Per step, after the running requests and the admissions have been scheduled
(so drafts never delay a prefill or a decode and never cause a preemption):

  add_drafts   the step's decodes (one token, the request's last, sampled) are the
               candidates; each may take up to min(K, tokens left before max_tokens and
               max_model_len) drafts.  The proposer proposes, the length policy cuts
               (SmartSpec goodput with the measured acceptance and step times), the
               drafts fit the token budget left, and KV slots are reserved for them
               (`allocate_slots(request, 1 + k)`; short of blocks: no drafts).  The
               scheduler emits token_ids = [last token, d_1..d_k], k + 1 positions.
               In a closed batch (`Scheduler.closed_batch`: every request submitted, nobody
               waiting) a saved step is the only gain: only the requests with the most
               tokens left draft, all the same k (`critical_set`, adaptive.choose_joint_length).
  on_output    the step's measured time feeds the step-time model; each verification
               (drafted k, accepted a = num_accepted - 1) the metrics and the policy.
  on_finished  the proposer learns the output (suffix tree) and drops the state.

Rejected drafts are rolled back by the scheduler not committing them
(num_computed_tokens = start + 1 + a); blocks left holding only rejected KV are
freed (KVCacheManager.trim).  Proposer states follow the requests' committed
tokens (`SpecDecodeManager.sync`), so stop rules, preemption and forks need no
extra protocol.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from kvserve.spec_decode import make_proposer
from kvserve.spec_decode.adaptive import SpecLengthPolicy
from kvserve.spec_decode.base import Proposer
from kvserve.spec_decode.config import SpeculativeConfig
from kvserve.spec_decode.manager import SpecDecodeManager
from kvserve.spec_decode.metrics import SpecDecodeMetrics
from kvserve.spec_decode.step_time import OnlineStepTime

if TYPE_CHECKING:
    from kvserve.core.scheduler import Scheduler
    from kvserve.protocol import ModelRunnerOutput, SchedulerOutput
    from kvserve.request import Request

# Suffix decoding's global tree over recent requests' outputs (tokens kept).
SUFFIX_GLOBAL_TOKENS = 16384
_DRAFT_COST_EMA = 0.2


def draft_pool_blocks(target_blocks: int, block_size: int, max_num_seqs: int, max_k: int) -> int:
    """Blocks of the draft's pool: enough that drafting is never short of blocks where the
    target has room.  A drafting request of n tokens holds cdiv(n + k - 1) draft blocks
    <= cdiv(n) + cdiv(k - 1) and at least cdiv(n) target blocks (this step's decode), and
    idle requests' draft KV is evicted first, so the target's count plus cdiv(K - 1) per
    running request suffices."""
    return target_blocks + max_num_seqs * -(-(max_k - 1) // block_size)


def _make_proposer(config: SpeculativeConfig, *, vocab_size: int, device: str, dtype: str,
                   num_blocks: Optional[int], block_size: Optional[int], attention_backend: str) -> Proposer:
    assert config.method is not None
    if config.draft_model is None:
        options = {"global_max_tokens": SUFFIX_GLOBAL_TOKENS} if config.method == "suffix" else {}
        return make_proposer(config.method, **options)
    if num_blocks is None or block_size is None:
        raise ValueError("a draft model needs its KV pool's num_blocks and block_size (the engine's)")
    import torch  # only the draft model needs it

    from kvserve.spec_decode.paged_draft import PagedDraftProposer

    return PagedDraftProposer.load(config.draft_model, num_blocks=num_blocks, block_size=block_size,
                                   dtype=getattr(torch, dtype), device=device, attention_backend=attention_backend,
                                   target_vocab_size=vocab_size)


def tokens_left(sched: "Scheduler", r: "Request") -> int:
    """Tokens request `r` may still generate (before max_tokens and max_model_len): an upper
    bound, since a stop token or string may end it sooner."""
    left = sched.max_model_len - r.num_tokens
    if r.sampling_params.max_tokens is not None:
        left = min(left, r.sampling_params.max_tokens - r.num_output_tokens)
    return max(0, left)


def critical_set(left: Sequence[tuple[str, int]]) -> set[str]:
    """The running requests with the most tokens left (`left`: (request id, tokens left) of
    each): in a closed batch, those the batch waits for (adaptive.choose_joint_length)."""
    if not left:
        return set()
    longest = max(n for _, n in left)
    return {rid for rid, n in left if n == longest}


# A request this many TPOT targets behind its pace values its tokens (1 + that) times at most;
# one ahead of its pace by half a target or more, half.
_SLO_WEIGHT_MAX, _SLO_WEIGHT_MIN = 4.0, 0.5


def slo_weights(sched: "Scheduler", requests: Sequence["Request"]) -> Optional[list[float]]:
    """What one token of each request is worth to the length policy, from its TPOT target
    (`slo.tpot_s`, or the scheduling policy's default): on pace 1; behind by x targets' time
    (first_token_time + tpot * outputs < now) 1 + x, at most 4; ahead, down to 0.5.  A late
    request's drafts then win over an early one's in the same step.  None: no request has a
    target (every token counts 1, and scaling all weights alike changes nothing)."""
    now = sched.clock()
    weights, any_target = [], False
    for r in requests:
        tpot = sched.policy.tpot_s(r)
        if tpot is None or r.first_token_time is None:
            weights.append(1.0)
            continue
        any_target = True
        behind = (now - r.first_token_time - tpot * r.num_output_tokens) / tpot  # in targets' time
        weights.append(min(_SLO_WEIGHT_MAX, max(_SLO_WEIGHT_MIN, 1.0 + behind)))
    return weights if any_target else None


class SpecScheduling:
    def __init__(self, manager: SpecDecodeManager, step_time: Optional[OnlineStepTime] = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.manager = manager
        self.step_time = step_time
        self.clock = clock
        self.max_k = manager.policy.max_k
        self._step_start: Optional[float] = None

    @classmethod
    def build(cls, config: SpeculativeConfig, *, vocab_size: int, device: str = "cpu",
              dtype: str = "float32", clock: Callable[[], float] = time.perf_counter,
              num_blocks: Optional[int] = None, block_size: Optional[int] = None,
              attention_backend: str = "auto", max_num_seqs: int = 0,
              proposer: Optional[Proposer] = None) -> "SpecScheduling":
        """The proposer by `config.method` (or `proposer`, already built), the policy, the
        step-time model.  A draft model loads here onto its own paged KV pool, batched, with
        the target's `attention_backend` (kvserve.spec_decode.paged_draft): `num_blocks`
        and `block_size` are the target's pool, `max_num_seqs` its most running requests
        (see draft_pool_blocks)."""
        assert config.method is not None, "speculation is off"
        if proposer is None:
            if num_blocks is not None and block_size is not None:
                num_blocks = draft_pool_blocks(num_blocks, block_size, max_num_seqs, config.num_speculative_tokens)
            proposer = _make_proposer(config, vocab_size=vocab_size, device=device, dtype=dtype,
                                      num_blocks=num_blocks, block_size=block_size,
                                      attention_backend=attention_backend)
        step_time = OnlineStepTime() if config.adaptive else None
        policy = SpecLengthPolicy(config.num_speculative_tokens, step_time=step_time, adaptive=config.adaptive)
        return cls(SpecDecodeManager(proposer, policy), step_time, clock)

    @property
    def metrics(self) -> SpecDecodeMetrics:
        return self.manager.metrics

    # ------------------------------------------------------------------ schedule
    def add_drafts(self, sched: "Scheduler", scheduled: list["Request"], num_new_tokens: dict[str, int],
                   budget: int) -> dict[str, list[int]]:
        """Drafts per request id for this step; adds them to `num_new_tokens` and reserves
        their KV slots.  Requests given none are absent."""
        out: dict[str, list[int]] = {}
        candidates: list[tuple[str, int]] = []
        by_id: dict[str, "Request"] = {}
        for r in scheduled if budget > 0 else ():
            cap = self._cap(sched, r, num_new_tokens[r.request_id])
            if cap > 0:
                self.manager.sync(r.request_id, r.all_token_ids, r.num_prompt_tokens)
                candidates.append((r.request_id, cap))
                by_id[r.request_id] = r
        base = sum(num_new_tokens.values()) - len(candidates)
        st = self.step_time
        if candidates and st is not None and st.num_buckets and not st.has(base + len(candidates)):
            candidates = []  # measure this step size without drafts first (step_time.py)
        jointly = False
        if candidates and sched.closed_batch and sched.num_waiting == 0 and self.manager.policy.adaptive:
            # Only the critical set's drafts can save a step, and only all of them together:
            # the others' rows join the base, and a critical request that cannot draft this
            # step (a prefill, no room) means no drafts at all.
            critical = critical_set([(r.request_id, tokens_left(sched, r)) for r in sched.running])
            chosen = [(rid, cap) for rid, cap in candidates if rid in critical]
            base += len(candidates) - len(chosen)
            candidates = chosen if len(chosen) == len(critical) else []
            jointly = True
        weights = None
        if candidates and not jointly and self.manager.policy.adaptive:
            weights = slo_weights(sched, [by_id[rid] for rid, _ in candidates])
        if candidates:
            t0 = self.clock()
            drafts = self.manager.drafts(candidates, base, jointly, weights)
            self._observe_draft_cost(self.clock() - t0, sum(len(d) for d in drafts.values()))
            for rid, _ in candidates:
                d = drafts.get(rid, [])[:budget]
                if not d:
                    continue
                # Room for the drafts' KV, else only the drafts that fit in the blocks the
                # request holds: speculation never preempts.
                r = by_id[rid]
                if sched.kv.allocate_slots(r, 1 + len(d)) is None:
                    d = d[:sched.kv.num_request_blocks(rid) * sched.kv.block_size - r.num_computed_tokens - 1]
                    if not d or sched.kv.allocate_slots(r, 1 + len(d)) is None:
                        continue
                out[rid] = d
                num_new_tokens[rid] += len(d)
                budget -= len(d)
        self._step_start = self.clock()
        return out

    def _cap(self, sched: "Scheduler", r: "Request", n: int) -> int:
        """Most drafts request `r` may take this step (0: it is not a decode, or at its end)."""
        if n != 1 or r.num_computed_tokens != r.num_tokens - 1 or r.num_samples_to_fork > 1:
            return 0  # a prefill chunk (or its last token, before n > 1 samples fork)
        sp = r.sampling_params
        if sp.prompt_logprobs is not None and r.num_computed_tokens < r.num_prompt_tokens:
            return 0  # the prompt's last position: its logprobs are reported from this step
        # The step emits up to drafts + 1 tokens, all within max_tokens and max_model_len.
        return min(self.max_k, tokens_left(sched, r) - 1)

    def _observe_draft_cost(self, seconds: float, num_drafted: int) -> None:
        """A draft model's time per proposed token, for the policy (free proposers: 0)."""
        if self.manager.proposer.proposes_for_free or num_drafted == 0:
            return
        pol = self.manager.policy
        # A draft model's first proposal for a request catches up on its prompt: a one-off
        # prefill, not a cost of each draft (paged_draft.py reports it; the dense one does not).
        seconds = max(0.0, seconds - getattr(self.manager.proposer, "last_prefill_s", 0.0))
        per_token = seconds / num_drafted
        pol.draft_token_s = per_token if pol.draft_token_s == 0.0 else (
            pol.draft_token_s + _DRAFT_COST_EMA * (per_token - pol.draft_token_s))

    # ------------------------------------------------------------------- output
    def on_output(self, step: "SchedulerOutput", result: "ModelRunnerOutput") -> None:
        """Before the scheduler commits the step: its time and each verification's outcome."""
        if self._step_start is not None and self.step_time is not None:
            self.step_time.observe(step.num_batched_tokens, self.clock() - self._step_start)
        self._step_start = None
        for rid in step.preempted_ids:  # a draft model frees their draft KV too
            self.manager.preempted(rid)
        for sr in step.requests:
            if sr.num_draft_tokens and sr.request_id in self.manager:  # absent: aborted meanwhile
                accepted = result.num_accepted.get(sr.request_id, len(sr.positions)) - 1
                self.manager.observe(sr.request_id, sr.num_draft_tokens, max(0, accepted))

    def on_finished(self, request: "Request") -> None:
        if request.request_id in self.manager:
            self.manager.sync(request.request_id, request.all_token_ids, request.num_prompt_tokens)
        self.manager.finish(request.request_id)
