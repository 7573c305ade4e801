"""Verification inside the model runner's step: requests that carry drafts.

A drafting request's k + 1 scheduled positions are [last committed token,
d_1..d_k]; the target's logits at them are the distributions of the token
after each.  Each position is processed as the non-speculative sampler would
process it at that point of the sequence:

  raw logprobs (reported)  log-softmax of the model's logits at the position
  penalties                over prompt + output + the drafts before the position
  min_tokens               by the position's output index (drafts count as output)
  greedy requests          greedy_verify on those logits: accept while the draft is
                           the argmax, then the argmax (token for token the
                           non-speculative output)
  sampled requests         temperature / top-k / top-p / min-p -> probabilities, then
                           rejection_sample with one-hot drafts (exact for drafts
                           from any source), the request's own generator if seeded

Output per request: the a accepted drafts then the bonus/correction token
(`sampled`), each with its logprobs, and `num_accepted` = 1 + a: the positions
whose KV stays valid (the last committed token and the accepted drafts).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from kvserve.protocol import ModelRunnerOutput, SampledToken, ScheduledRequest
from kvserve.spec_decode.rejection import greedy_verify, rejection_sample
from kvserve.worker.sampler import SamplingRow, apply_min_tokens, apply_penalties, top_logprobs, truncate

if TYPE_CHECKING:
    from kvserve.worker.model_runner import ModelRunner


def position_rows(runner: "ModelRunner", r: ScheduledRequest) -> list[SamplingRow]:
    """One sampling row per scored position of drafting request `r`: the history seen at
    position j is the output so far plus drafts d_1..d_j."""
    base = runner._sampling_row(r)
    drafts = list(r.token_ids[1:])
    rows = [base]
    for j in range(1, r.num_draft_tokens + 1):
        rows.append(SamplingRow(base.params, base.prompt_token_ids, [*base.output_token_ids, *drafts[:j]],
                                base.generator, base.stop_ids_for_min_tokens))
    return rows


def verify_drafts(runner: "ModelRunner", hidden: torch.Tensor, ordered: Sequence[ScheduledRequest],
                  ends: np.ndarray, out: ModelRunnerOutput) -> tuple[list[ScheduledRequest], torch.Tensor]:
    """Verify every sampled request with drafts into `out`; return the other sampled requests
    and their logits, for the runner's ordinary sampling.

    One LM-head call scores the drafting requests' positions and the other requests' last
    positions together: on a memory-bound CPU each call streams the whole head (113 MB for
    SmolLM2 in fp32, ~6 ms), so two calls made a mixed step ~7 ms slower than one."""
    plain: list[ScheduledRequest] = []
    plain_idx: list[int] = []
    spec: list[ScheduledRequest] = []
    row_idx: list[int] = []
    for i, r in enumerate(ordered):
        if not r.sample:
            continue
        end = int(ends[i])
        if r.num_draft_tokens:
            spec.append(r)
            row_idx.extend(range(end - 1 - r.num_draft_tokens, end))
        else:
            plain.append(r)
            plain_idx.append(end - 1)
    both = runner.model.compute_logits(hidden[row_idx + plain_idx])  # [sum(k + 1) + len(plain), V]
    logits, plain_logits = both[:len(row_idx)], both[len(row_idx):]
    rows = [row for r in spec for row in position_rows(runner, r)]
    raw_lp = logits.log_softmax(-1) if any(r.sampling_params.logprobs is not None for r in spec) else None
    if any(r.sampling_params.needs_penalties or r.sampling_params.min_tokens for r in spec):
        logits = logits.clone()
        apply_penalties(logits, rows)
        apply_min_tokens(logits, rows)
    starts = np.cumsum([0] + [r.num_draft_tokens + 1 for r in spec])
    results: dict[int, tuple[list[int], int]] = {}  # index in spec -> (tokens, accepted)
    for greedy in (True, False):
        group = [i for i, r in enumerate(spec) if r.sampling_params.greedy == greedy]
        if not group:
            continue
        sel = [j for i in group for j in range(int(starts[i]), int(starts[i + 1]))]
        drafts = [t for i in group for t in spec[i].token_ids[1:]]
        ks = [spec[i].num_draft_tokens for i in group]
        if greedy:
            res = greedy_verify(logits[sel], drafts, ks)
        else:
            probs = truncate(logits[sel], [rows[j] for j in sel])
            gens: list[Optional[torch.Generator]] = [rows[int(starts[i])].generator for i in group]
            res = rejection_sample(probs, drafts, ks, generators=gens, generator=runner.sampler.generator)
        for i, toks, acc in zip(group, res.token_ids, res.num_accepted):
            results[i] = (toks, acc)
    for i, r in enumerate(spec):
        toks, acc = results[i]
        k = r.sampling_params.logprobs
        lps: list[Optional[dict[int, float]]] = [None] * len(toks)
        if k is not None and raw_lp is not None:
            first = int(starts[i])
            chosen = torch.tensor(toks, dtype=torch.long, device=raw_lp.device)
            lps = list(top_logprobs(raw_lp[first:first + len(toks)], k, chosen))
        out.sampled[r.request_id] = [SampledToken(t, lp) for t, lp in zip(toks, lps)]
        out.num_accepted[r.request_id] = 1 + acc
    return plain, plain_logits
