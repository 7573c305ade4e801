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
        for p in meta.prefills:
            qs = q[p.q_start:p.q_start + p.q_len]
            if p.start_pos == 0:
                ks = k[p.q_start:p.q_start + p.q_len]
                vs = v[p.q_start:p.q_start + p.q_len]
                mask = None
            else:
                ks = cache[0][p.block_ids].flatten(0, 1)[:p.ctx_len]  # [L, KVH, D]
                vs = cache[1][p.block_ids].flatten(0, 1)[:p.ctx_len]
                qpos = torch.arange(p.start_pos, p.ctx_len, device=q.device).unsqueeze(1)
                kpos = torch.arange(p.ctx_len, device=q.device).unsqueeze(0)
                mask = kpos <= qpos  # [Q, L] True = attend
            out[p.q_start:p.q_start + p.q_len] = self._sdpa(qs, ks, vs, mask)
        return out

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
        """q [B, H, D] -> [B, H, D] over each request's paged context."""
        B = q.shape[0]
        kvh, dh = self.num_kv_heads, self.head_dim
        group = self.num_heads // kvh
        tables = meta.decode_block_tables  # [B, MB]
        # [B, MB, BS, KVH, D] -> [B, KVH, L, D]
        kc = cache[0][tables].flatten(1, 2).permute(0, 2, 1, 3)
        vc = cache[1][tables].flatten(1, 2).permute(0, 2, 1, 3)
        qg = q.view(B, kvh, group, dh)  # [B, KVH, G, D]
        scores = torch.matmul(qg, kc.transpose(-1, -2)) * self.scale  # [B, KVH, G, L]
        scores = scores + meta.decode_mask  # [B, 1, 1, L]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(probs, vc).reshape(B, self.num_heads, dh)
