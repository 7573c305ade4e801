"""Verification of draft tokens: greedy matching and rejection sampling, for a batch with variable k.

Layout (the order the target scores a mixed batch in): request i proposes
k_i >= 0 draft tokens and the target scores k_i + 1 positions for it, the
distributions of the token after the last committed token and after each
draft.  Rows are concatenated over requests:

    target rows  [sum_i (k_i + 1), V]   request i: rows t_i .. t_i + k_i
    draft ids    [sum_i k_i]            request i: d_i .. d_i + k_i - 1
    draft probs  [sum_i k_i, V] or None (None: deterministic drafts, i.e. one-hot)

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft x_j is
accepted with probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection
j the output token is drawn from norm(max(0, p_j - q_j)); if all k are
accepted, a bonus token is drawn from p_k.  The emitted tokens are then
distributed exactly as tokens sampled one at a time from the target.  A
deterministic draft (n-gram, suffix, greedy draft model) has q_j = one-hot(x_j):
accept with probability p_j(x_j), else draw from p_j with x_j removed.

Greedy verification accepts while the draft equals the target's argmax and
then emits the argmax, so greedy outputs equal non-speculative greedy
decoding token for token.  (It is also rejection sampling with a one-hot
target, `test_greedy_is_rejection_sampling_with_one_hot_target`.)

Randomness: a request with a generator draws all its randomness from it, a
fixed amount per step given k (k uniforms, then V exponentials for the final
token), so a seeded request's tokens do not depend on the rest of the batch
or on how many drafts were accepted before.  Unseeded requests share one
draw from `generator`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class VerifyOutput:
    token_ids: list[list[int]]  # per request: accepted drafts, then the bonus/correction token
    num_accepted: list[int]  # per request: accepted drafts (len(token_ids[i]) - 1)


def _offsets(num_draft: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.tensor(list(num_draft), dtype=torch.long)
    if bool((k < 0).any()):
        raise ValueError(f"draft counts must be >= 0, got {list(num_draft)}")
    d_off = torch.cumsum(k, 0) - k  # first draft row per request
    return k, d_off


def _check_shapes(target: torch.Tensor, draft_ids: torch.Tensor, k: torch.Tensor,
                  draft_probs: Optional[torch.Tensor]) -> None:
    B, K = k.numel(), int(k.sum())
    if target.dim() != 2 or target.shape[0] != K + B:
        raise ValueError(f"target has shape {tuple(target.shape)}, expected [{K + B}, vocab] "
                         f"for {B} requests with {K} drafts")
    if draft_ids.shape != (K,):
        raise ValueError(f"draft ids have shape {tuple(draft_ids.shape)}, expected [{K}]")
    if draft_probs is not None and tuple(draft_probs.shape) != (K, target.shape[1]):
        raise ValueError(f"draft probs have shape {tuple(draft_probs.shape)}, expected [{K}, {target.shape[1]}]")


def _num_accepted(accept: torch.Tensor, k: torch.Tensor, d_off: torch.Tensor) -> torch.Tensor:
    """Per request, the number of leading True in its segment of `accept` [sum k]."""
    B, kmax = k.numel(), int(k.max()) if k.numel() else 0
    if kmax == 0:
        return torch.zeros(B, dtype=torch.long, device=k.device)
    cols = torch.arange(kmax, device=k.device).unsqueeze(0)  # [1, kmax]
    valid = cols < k.unsqueeze(1)  # [B, kmax]
    idx = (d_off.unsqueeze(1) + cols).clamp(max=accept.numel() - 1)  # kmax > 0 => accept is not empty
    return (accept[idx] & valid).long().cumprod(1).sum(1)


def _split(draft_ids: list[int], final: list[int], k: list[int], acc: list[int]) -> VerifyOutput:
    out, pos = [], 0
    for i in range(len(k)):
        out.append(draft_ids[pos:pos + acc[i]] + [final[i]])
        pos += k[i]
    return VerifyOutput(out, acc)


def greedy_verify(target_scores: torch.Tensor, draft_token_ids: torch.Tensor | Sequence[int],
                  num_draft_tokens: Sequence[int]) -> VerifyOutput:
    """Accept while the draft is the argmax of `target_scores` (the same tensor the
    non-speculative sampler takes the argmax of: logits after penalties), then the argmax."""
    draft = torch.as_tensor(draft_token_ids, dtype=torch.long).reshape(-1)
    k, d_off = _offsets(num_draft_tokens)
    _check_shapes(target_scores, draft, k, None)
    t_off = d_off + torch.arange(k.numel())  # first target row per request
    top = target_scores.argmax(dim=-1).cpu()  # [sum(k + 1)]
    # The target row scoring draft j of request i is t_off[i] + j.
    draft_rows = torch.repeat_interleave(t_off - d_off, k) + torch.arange(draft.numel())
    acc = _num_accepted(draft == top[draft_rows], k, d_off)
    final = top[t_off + acc]
    return _split(draft.tolist(), final.tolist(), k.tolist(), acc.tolist())


def _draw_noise(B: int, k: torch.Tensor, V: int, generators: Optional[Sequence[Optional[torch.Generator]]],
                generator: Optional[torch.Generator], device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniforms [sum k] and exponentials [B, V]; per-request generators where given."""
    K = int(k.sum())
    u = torch.empty(K, dtype=dtype, device=device)
    e = torch.empty((B, V), dtype=dtype, device=device)
    gens = list(generators) if generators is not None else [None] * B
    if len(gens) != B:
        raise ValueError(f"{len(gens)} generators for {B} requests")
    shared = [i for i, g in enumerate(gens) if g is None]
    ks = k.tolist()
    starts = (torch.cumsum(k, 0) - k).tolist()
    if shared:
        # One draw for all unseeded requests (their order in the batch decides what they get).
        if len(shared) == B:
            u.uniform_(generator=generator)
            e.exponential_(generator=generator)
        else:
            rows = torch.tensor(shared)
            mask = torch.zeros(K, dtype=torch.bool)
            for i in shared:
                mask[starts[i]:starts[i] + ks[i]] = True
            u[mask.to(device)] = torch.empty(int(mask.sum()), dtype=dtype, device=device).uniform_(
                generator=generator)
            e[rows.to(device)] = torch.empty((len(shared), V), dtype=dtype,
                                             device=device).exponential_(generator=generator)
    for i, g in enumerate(gens):
        if g is not None:
            u[starts[i]:starts[i] + ks[i]].uniform_(generator=g)
            e[i].exponential_(generator=g)
    return u, e


def rejection_sample(target_probs: torch.Tensor, draft_token_ids: torch.Tensor | Sequence[int],
                     num_draft_tokens: Sequence[int], draft_probs: Optional[torch.Tensor] = None,
                     generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                     generator: Optional[torch.Generator] = None) -> VerifyOutput:
    """Speculative sampling for a batch; see the module docstring for the layout.

    target_probs: [sum(k+1), V], each row a distribution (after temperature, top-k/p, ...).
    draft_probs: [sum k, V] distributions the drafts were drawn from, or None for
    deterministic drafts.  generators: per request (None entries share `generator`).
    """
    device = target_probs.device
    draft = torch.as_tensor(draft_token_ids, dtype=torch.long).reshape(-1).to(device)
    k_cpu, d_off_cpu = _offsets(num_draft_tokens)
    _check_shapes(target_probs, draft, k_cpu, draft_probs)
    B, V = k_cpu.numel(), target_probs.shape[1]
    k, d_off = k_cpu.to(device), d_off_cpu.to(device)
    t_off = d_off + torch.arange(B, device=device)
    # Computed in the probabilities' dtype (float32 from the sampler): a float64 copy of
    # [sum(k+1), V] would cost more than the verification itself at large vocabularies.
    p = target_probs if target_probs.is_floating_point() else target_probs.float()
    u, e = _draw_noise(B, k_cpu, V, generators, generator, device, p.dtype)

    draft_rows = torch.repeat_interleave(t_off - d_off, k) + torch.arange(draft.numel(), device=device)
    p_tok = p[draft_rows, draft]  # target prob of each draft token
    q_tok = draft_probs.to(p.dtype)[torch.arange(draft.numel(), device=device), draft] \
        if draft_probs is not None else torch.ones_like(p_tok)
    accept = u * q_tok < p_tok  # u ~ U[0, 1): P(accept) = min(1, p / q)
    acc = _num_accepted(accept, k, d_off)

    # Final token: residual max(0, p - q) at the first rejection, else p after the last draft.
    final_p = p[t_off + acc]  # [B, V]
    rejected = acc < k
    rej_idx = torch.nonzero(rejected).flatten()
    if rej_idx.numel():
        d_rows = d_off[rej_idx] + acc[rej_idx]
        if draft_probs is not None:
            q_rows = draft_probs.to(p.dtype)[d_rows]
        else:
            q_rows = torch.zeros((rej_idx.numel(), V), dtype=p.dtype, device=device)
            q_rows[torch.arange(rej_idx.numel(), device=device), draft[d_rows]] = 1.0
        resid = (final_p[rej_idx] - q_rows).clamp_(min=0.0)
        # sum 0 only if p == q on the row, where rejection has probability 0; keep p then.
        ok = resid.sum(-1, keepdim=True) > 0
        final_p[rej_idx] = torch.where(ok, resid, final_p[rej_idx])
    # Exponential race: argmax p_i / E_i is an exact draw from p / sum(p).
    final = (final_p / e).argmax(dim=-1)
    return _split(draft.tolist(), final.tolist(), k_cpu.tolist(), acc.tolist())


def probs_from_scores(scores: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """softmax(scores / temperature) rows; a helper for tests and simple callers
    (the engine passes the sampler's processed distributions instead)."""
    return (scores.float() / temperature).softmax(-1)
