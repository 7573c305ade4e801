"""Speculative decoding building blocks: proposers, verification, adaptive length, metrics.

See docs/spec_decode.md for how they plug into the engine step.  Importing
this package (and the n-gram / suffix proposers, adaptive length and
metrics) does not import torch; the draft model, dense runner, verifier and
reference loop do.
"""
from __future__ import annotations

from typing import Any

from kvserve.spec_decode.base import Proposer, ProposerState

METHODS = ("ngram", "suffix", "draft:PATH")


def make_proposer(method: str, **options: Any) -> Proposer:
    """A proposer by `--speculative-method` name: ngram | suffix | draft:PATH (a model directory).
    For draft:PATH this is the dense, one-request-at-a-time reference (DraftModelProposer); the
    engine builds the batched, paged one (SpecScheduling.build -> paged_draft.PagedDraftProposer)."""
    if method == "ngram":
        from kvserve.spec_decode.ngram import NgramProposer

        return NgramProposer(**options)
    if method == "suffix":
        from kvserve.spec_decode.suffix import SuffixProposer

        return SuffixProposer(**options)
    if method.startswith("draft:") and len(method) > len("draft:"):
        from kvserve.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer.load(method[len("draft:"):], **options)
    raise ValueError(f"unknown speculative method {method!r}; choose from {', '.join(METHODS)}")


__all__ = ["METHODS", "Proposer", "ProposerState", "make_proposer"]
