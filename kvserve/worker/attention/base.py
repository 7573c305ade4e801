"""The attention backend interface and the per-step forward context.

A backend turns the step's flattened q/k/v into attention output while
reading and writing the paged KV cache.  The model never sees block tables:
everything a backend needs arrives in `AttentionMetadata`, built once per step
by the model runner and shared by all layers.

Flattened token order within a step: all decode tokens first (one per
request whose query is a single token), then each prefill chunk contiguously.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

# The forward-context types live in kvserve.protocol (the models import them from
# there); re-exported here for the backends and older imports.
from kvserve.protocol import AttentionMetadata, ForwardContext, PrefillSeq

__all__ = ["AttentionBackend", "AttentionMetadata", "ForwardContext", "PrefillSeq"]


class AttentionBackend(ABC):
    """One implementation per device family; selected by name in the registry."""

    name: str = "abstract"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    @abstractmethod
    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] (rotated) -> [T, H, D].

        Writes k/v into `ctx.kv_caches[layer_idx]` at `ctx.meta.slot_mapping`
        before reading the cache, so a chunk attends to itself and its prefix.
        """

    @staticmethod
    def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        _, nb, bs, kvh, d = cache.shape
        cache[0].view(nb * bs, kvh, d).index_copy_(0, slot_mapping, k)
        cache[1].view(nb * bs, kvh, d).index_copy_(0, slot_mapping, v)
