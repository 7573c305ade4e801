"""Token-level agreement of a candidate engine configuration with a reference.

Both sides score the *same* token sequence: the candidate's greedy continuation
of a prompt.  The candidate's next-token distributions come from its own decode
steps (so they see whatever its configuration does to the KV cache: a lossy
codec on a tier round trip, quantization, eviction); the reference's come from
one teacher-forced prefill of prompt + continuation in full precision.

For each continuation position t (both conditioned on the same prefix):
- top-1 agreement: argmax of the reference == argmax of the candidate;
- KL(reference || candidate) of the full next-token distributions, in nats;
- greedy match length: the number of leading positions where the reference's
  greedy token equals the candidate's token.  Since both are conditioned on the
  candidate's prefix, this is exactly the length of the common prefix of the two
  configurations' greedy outputs;
- perplexity of the candidate's continuation under the reference (full-precision KV):
  exp(mean over tokens of -log p_ref(token | prefix)).  For the reference's own greedy
  output this is its floor; a lossy candidate that drifts onto tokens the reference finds
  unlikely raises it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class SequenceComparison:
    """One continuation of `num_tokens` tokens scored by both sides."""

    num_tokens: int
    top1_agree: int
    kl_sum: float  # nats, summed over positions
    kl_max: float
    greedy_match: int
    ref_nll_sum: float = 0.0  # nats: -sum_t log p_ref(cand_tokens[t])


def compare_sequence(ref_logprobs: torch.Tensor, cand_logprobs: torch.Tensor,
                     cand_tokens: list[int]) -> SequenceComparison:
    """`ref_logprobs`, `cand_logprobs`: [N, vocab] log-softmax rows for the N positions
    that predict `cand_tokens` (the candidate's own output)."""
    if ref_logprobs.shape != cand_logprobs.shape or ref_logprobs.shape[0] != len(cand_tokens):
        raise ValueError(f"shape mismatch: reference {tuple(ref_logprobs.shape)}, candidate "
                         f"{tuple(cand_logprobs.shape)}, {len(cand_tokens)} tokens")
    ref = ref_logprobs.double()
    cand = cand_logprobs.double()
    ref_top = ref.argmax(-1)
    agree = ref_top == cand.argmax(-1)
    # p*(log p - log q) with 0*log0 = 0; clamp tiny negatives from rounding.
    p = ref.exp()
    kl = torch.where(p > 0, p * (ref - cand), torch.zeros_like(p)).sum(-1).clamp(min=0.0)
    tokens = torch.tensor(cand_tokens, dtype=torch.long)
    mismatch = (ref_top != tokens).nonzero()
    match = int(mismatch[0, 0]) if mismatch.numel() else len(cand_tokens)
    nll = float(-ref.gather(-1, tokens[:, None]).sum()) if len(cand_tokens) else 0.0
    return SequenceComparison(len(cand_tokens), int(agree.sum()), float(kl.sum()),
                              float(kl.max()) if len(cand_tokens) else 0.0, match, nll)


@dataclass(slots=True)
class TokenMetrics:
    """Aggregate over sequences (one cell: a context length)."""

    sequences: list[SequenceComparison] = field(default_factory=list)

    def add(self, c: SequenceComparison) -> None:
        self.sequences.append(c)

    def summary(self) -> dict[str, float]:
        n_tok = sum(c.num_tokens for c in self.sequences)
        n_seq = len(self.sequences)
        if not n_tok:
            return {"sequences": n_seq, "tokens": 0}
        return {
            "sequences": n_seq,
            "tokens": n_tok,
            "top1_agreement": sum(c.top1_agree for c in self.sequences) / n_tok,
            "kl_mean": sum(c.kl_sum for c in self.sequences) / n_tok,
            "kl_max": max(c.kl_max for c in self.sequences),
            "greedy_match_mean": sum(c.greedy_match for c in self.sequences) / n_seq,
            "full_match_fraction": sum(c.greedy_match == c.num_tokens for c in self.sequences) / n_seq,
            "ref_perplexity": math.exp(sum(c.ref_nll_sum for c in self.sequences) / n_tok),
        }
