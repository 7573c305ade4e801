"""The reference speculative decoding loop, one request, outside the engine.

    propose k drafts -> target scores [last committed token, drafts] (k + 1 positions)
      -> verify (greedy or rejection sampling) -> commit accepted + 1 token
      -> the next step's `ensure` drops the rejected drafts' KV (rollback by not keeping)

It is the oracle the engine integration is tested against (same outputs,
greedy), and it states the step's semantics in a few lines.  Target and
draft both run on kvserve.spec_decode.dense_runner.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from kvserve.spec_decode.adaptive import SpecLengthPolicy
from kvserve.spec_decode.base import Proposer
from kvserve.spec_decode.dense_runner import DenseModelRunner
from kvserve.spec_decode.metrics import SpecDecodeMetrics
from kvserve.spec_decode.rejection import greedy_verify, probs_from_scores, rejection_sample


@dataclass
class SpecGenerateResult:
    token_ids: list[int]
    num_target_steps: int  # target forward passes (a step emits 1 + accepted tokens)
    metrics: SpecDecodeMetrics = field(default_factory=SpecDecodeMetrics)
    first_step_s: float = 0.0  # wall time of the first step (the prefill and first token(s))
    first_step_tokens: int = 0  # tokens the first step emitted
    decode_s: float = 0.0  # wall time of the steps after it
    decode_cpu_s: float = 0.0  # this process's CPU time in them (steadier on a shared machine)


def _cut_at_eos(tokens: list[int], eos: frozenset[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1], True
    return tokens, False


def speculative_generate(target: DenseModelRunner, proposer: Optional[Proposer], prompt: Sequence[int],
                         max_new_tokens: int, num_spec_tokens: int = 4, temperature: float = 0.0,
                         generator: Optional[torch.Generator] = None, eos_token_ids: Iterable[int] = (),
                         policy: Optional[SpecLengthPolicy] = None, request_id: str = "r0") -> SpecGenerateResult:
    """Generate up to `max_new_tokens` after `prompt`; `proposer=None` decodes without speculation.

    temperature 0 is greedy (outputs equal plain greedy decoding); otherwise
    tokens are sampled from softmax(logits / temperature), exactly in distribution.
    `policy` (optional) picks k from the proposal each step and learns acceptance.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = frozenset(eos_token_ids)
    seq = target.new_sequence(capacity=len(prompt) + max_new_tokens + num_spec_tokens + 1)
    state = proposer.new_state(prompt) if proposer is not None else None
    tokens = list(prompt)
    out: list[int] = []
    result = SpecGenerateResult(out, 0)
    while len(out) < max_new_tokens:
        t0, c0 = time.perf_counter(), time.process_time()
        k = min(num_spec_tokens, max_new_tokens - len(out) - 1)  # never draft past the budget
        drafts = proposer.propose(state, k) if proposer is not None and state is not None and k > 0 else []
        if policy is not None and drafts:
            drafts = drafts[:policy.choose([(request_id, len(drafts))])[0]]
        logits = target.ensure(seq, tokens + drafts, logits_from=len(tokens) - 1)  # [len(drafts) + 1, V]
        if temperature == 0.0:
            res = greedy_verify(logits, drafts, [len(drafts)])
        else:
            res = rejection_sample(probs_from_scores(logits, temperature), drafts, [len(drafts)],
                                   generators=[generator])
        result.num_target_steps += 1
        result.metrics.observe(len(drafts), res.num_accepted[0])
        if policy is not None:
            policy.observe(request_id, len(drafts), res.num_accepted[0])
        new, stopped = _cut_at_eos(res.token_ids[0], eos)
        tokens.extend(new)
        out.extend(new)
        if state is not None:
            state.append(new)
        if result.num_target_steps == 1:
            result.first_step_s = time.perf_counter() - t0
            result.first_step_tokens = len(new)
        else:
            result.decode_s += time.perf_counter() - t0
            result.decode_cpu_s += time.process_time() - c0
        if stopped:
            break
    if proposer is not None and state is not None:
        proposer.finish(state)
    if policy is not None:
        policy.remove(request_id)
    return result
