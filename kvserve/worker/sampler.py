"""Sampler: logits -> next tokens, for a batch of requests with mixed options.

Order of operations per row (as vLLM/HF do):
  raw logprobs (reported)  <- log_softmax of the model's logits
  penalties                (repetition on prompt+output; presence/frequency on output)
  min_tokens               (EOS and stop ids masked until min_tokens are out)
  greedy rows: argmax
  sampled rows: temperature -> top_k -> top_p -> min_p -> draw

Draws use the exponential race (argmax p_i / E_i with E_i ~ Exp(1)), which
is an exact sample of p.  A seeded request draws its E from its own
generator, so its tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from kvserve.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: Optional[torch.Generator]  # per-request RNG for seeded requests
    stop_ids_for_min_tokens: frozenset[int]  # EOS + stop_token_ids, masked before min_tokens


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: {token_id: logprob} for the top-k and the sampled token, or None.
    logprobs: list[Optional[dict[int, float]]]


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place, for rows with any penalty set."""
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if not p.needs_penalties:
            continue
        out_ids = torch.tensor(list(row.output_token_ids), dtype=torch.long, device=logits.device)
        out_ids = out_ids[out_ids < vocab]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(list(row.prompt_token_ids), dtype=torch.long, device=logits.device)
            seen = torch.unique(torch.cat([seen[seen < vocab], out_ids]))
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if out_ids.numel() and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
            counts = torch.bincount(out_ids, minlength=vocab).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        if len(row.output_token_ids) < row.params.min_tokens and row.stop_ids_for_min_tokens:
            ids = [t for t in row.stop_ids_for_min_tokens if t < logits.shape[-1]]
            logits[i, ids] = float("-inf")


def truncate(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p for the given (all non-greedy) rows -> probs."""
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=device)
    logits = logits / temps.unsqueeze(1)
    vocab = logits.shape[-1]
    top_k = [r.params.top_k if r.params.top_k > 0 else vocab for r in rows]
    top_p = [r.params.top_p for r in rows]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        ks = torch.tensor(top_k, device=device).unsqueeze(1)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= ks, float("-inf"))
        probs_sorted = sorted_logits.softmax(-1)
        ps = torch.tensor(top_p, dtype=probs_sorted.dtype, device=device).unsqueeze(1)
        # Keep a token if the mass strictly before it is < top_p (the top token always stays).
        mass_before = probs_sorted.cumsum(-1) - probs_sorted
        sorted_logits = sorted_logits.masked_fill(mass_before >= ps, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
    probs = logits.softmax(-1)
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=probs.dtype, device=device)
    if bool((min_p > 0).any()):
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, rows: list[SamplingRow], default_gen: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row by the exponential race; per-row generators where seeded."""
    noise = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        sub = torch.empty((len(unseeded), probs.shape[1]), dtype=probs.dtype, device=probs.device)
        sub.exponential_(generator=default_gen)
        noise[unseeded] = sub
    for i, r in enumerate(rows):
        if r.generator is not None:
            noise[i].exponential_(generator=r.generator)
    return (probs / noise).argmax(dim=-1)


def top_logprobs(raw_logprobs: torch.Tensor, k: int, chosen: torch.Tensor) -> list[dict[int, float]]:
    """Per row: the top-k {id: logprob} plus the chosen token's."""
    out = []
    if k > 0:
        vals, ids = raw_logprobs.topk(k, dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
    chosen_l = chosen.tolist()
    chosen_lp = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    for r in range(raw_logprobs.shape[0]):
        d = {ids[r][j]: vals[r][j] for j in range(k)} if k > 0 else {}
        d[chosen_l[r]] = chosen_lp[r]
        out.append(d)
    return out


class Sampler:
    def __init__(self, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: float32 [N, vocab], one row per entry of `rows`."""
        n = logits.shape[0]
        want_lp = [r.params.logprobs for r in rows]
        raw_lp = logits.log_softmax(-1) if any(k is not None for k in want_lp) else None
        if any(r.params.needs_penalties for r in rows) or any(r.params.min_tokens for r in rows):
            logits = logits.clone()
            apply_penalties(logits, rows)
            apply_min_tokens(logits, rows)
        tokens = torch.empty(n, dtype=torch.long, device=logits.device)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(greedy) == n:
            tokens = logits.argmax(dim=-1)
        else:
            if greedy:
                tokens[greedy] = logits[greedy].argmax(dim=-1)
            sub_rows = [rows[i] for i in sampled]
            probs = truncate(logits[sampled], sub_rows)
            tokens[sampled] = draw(probs, sub_rows, self.generator)
        logprobs: list[Optional[dict[int, float]]] = [None] * n
        if raw_lp is not None:
            for i, k in enumerate(want_lp):
                if k is not None:
                    logprobs[i] = top_logprobs(raw_lp[i:i + 1], k, tokens[i:i + 1])[0]
        return SamplerOutput(token_ids=tokens.tolist(), logprobs=logprobs)
