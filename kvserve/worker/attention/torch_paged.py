"""Paged attention in plain PyTorch, efficient on CPU and device-agnostic.

- Decodes (single-token queries) run as one batched computation: each
  request's blocks are gathered block-wise from the pool, and grouped-query
  attention is computed without repeating K/V (queries are viewed as
  [KVH, group] so each KV head serves its query group in one matmul).
- A prefill chunk with no cached prefix attends to its own fresh K/V with a
  causal SDPA call; a chunk after a cached prefix gathers its context from the
  pool and uses an offset causal mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.worker.attention.base import AttentionBackend, ForwardContext


class TorchPagedAttention(AttentionBackend):
    name = "torch"

    def forward(self, layer_idx, q, k, v, ctx: ForwardContext):
        meta = ctx.meta
        cache = ctx.kv_caches[layer_idx]
        self.write_kv(cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        D = meta.num_decode_tokens
        if D:
            out[:D] = self._decode(q[:D], cache, meta)
        if meta.prefills:
            self._prefill(out, q, k, v, cache, meta)
        return out

    def _prefill(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 cache: torch.Tensor, meta) -> None:
        """Writes the attention of every prefill chunk of the step into its rows of `out`
        (the cache already holds the step's K/V).  Per chunk: causal SDPA on its own K/V, or,
        after a cached prefix, on the context gathered from the pool with an offset mask."""
        for p in meta.prefills:
            qs = q[p.q_start:p.q_start + p.q_len]
            if p.start_pos == 0:
                ks = k[p.q_start:p.q_start + p.q_len]
                vs = v[p.q_start:p.q_start + p.q_len]
                mask = None
            else:
                ks = cache[0].index_select(0, p.block_ids).flatten(0, 1)[:p.ctx_len]  # [L, KVH, D]
                vs = cache[1].index_select(0, p.block_ids).flatten(0, 1)[:p.ctx_len]
                qpos = torch.arange(p.start_pos, p.ctx_len, device=q.device).unsqueeze(1)
                kpos = torch.arange(p.ctx_len, device=q.device).unsqueeze(0)
                mask = kpos <= qpos  # [Q, L] True = attend
            out[p.q_start:p.q_start + p.q_len] = self._sdpa(qs, ks, vs, mask)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """q [Q, H, D], k/v [L, KVH, D] -> [Q, H, D]; causal when mask is None."""
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
        kh = k.transpose(0, 1).unsqueeze(0)
        vh = v.transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return o.squeeze(0).transpose(0, 1)

    def _decode(self, q: torch.Tensor, cache: torch.Tensor, meta) -> torch.Tensor:
        """q [B, H, D] -> [B, H, D] over each request's paged context.

        Blocks are gathered with one index_select per K/V (several times
        faster than advanced indexing on CPU) and attended with SDPA on a
        strided [B, KVH, L, D] view; GQA is handled inside SDPA without
        materializing repeated K/V.  Padded key positions are masked.
        """
        B = q.shape[0]
        tables = meta.decode_block_tables  # [B, MB]
        flat = tables.reshape(-1)
        _, _, bs, kvh, dh = cache.shape
        kc = cache[0].index_select(0, flat).view(B, -1, kvh, dh).transpose(1, 2)  # [B, KVH, L, D]
        vc = cache[1].index_select(0, flat).view(B, -1, kvh, dh).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), kc, vc, attn_mask=meta.decode_mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [B, H, 1, D]
        return o.squeeze(2)
