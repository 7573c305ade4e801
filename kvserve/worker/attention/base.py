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
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class PrefillSeq:
    q_start: int  # offset of the chunk in the flattened batch
    q_len: int
    start_pos: int  # tokens already in the cache before this chunk
    block_ids: torch.Tensor  # [num_blocks] long, covering start_pos + q_len tokens

    @property
    def ctx_len(self) -> int:
        return self.start_pos + self.q_len


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: cache slot (block_id * block_size + offset) of each new token
    num_decode_tokens: int  # the first D tokens are single-token queries
    decode_block_tables: Optional[torch.Tensor]  # [D, max_blocks] long, padded with block 0
    decode_seq_lens: Optional[torch.Tensor]  # [D] long: context length including the new token
    decode_mask: Optional[torch.Tensor]  # [D, 1, 1, max_blocks * block_size] bool, True = attend
    prefills: list[PrefillSeq] = field(default_factory=list)
    block_size: int = 16


@dataclass
class ForwardContext:
    backend: "AttentionBackend"
    kv_caches: list[torch.Tensor]  # per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata


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
