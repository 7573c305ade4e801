"""Reference attention: one sequence at a time, explicit masked softmax in float32.

Slow and obviously correct; the fast backends are tested equal to it.
"""
from __future__ import annotations

import torch

from kvserve.worker.attention.base import AttentionBackend, ForwardContext


class ReferenceAttention(AttentionBackend):
    name = "reference"

    def forward(self, layer_idx, q, k, v, ctx: ForwardContext):
        meta = ctx.meta
        cache = ctx.kv_caches[layer_idx]
        self.write_kv(cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        seqs = []
        for i in range(meta.num_decode_tokens):
            ctx_len = int(meta.decode_seq_lens[i])
            nblk = -(-ctx_len // meta.block_size)
            seqs.append((i, 1, ctx_len - 1, meta.decode_block_tables[i, :nblk]))
        for p in meta.prefills:
            seqs.append((p.q_start, p.q_len, p.start_pos, p.block_ids))
        group = self.num_heads // self.num_kv_heads
        for q_start, q_len, start_pos, block_ids in seqs:
            ctx_len = start_pos + q_len
            kc = cache[0][block_ids].reshape(-1, self.num_kv_heads, self.head_dim)[:ctx_len].float()
            vc = cache[1][block_ids].reshape(-1, self.num_kv_heads, self.head_dim)[:ctx_len].float()
            kc = kc.repeat_interleave(group, dim=1)  # [L, H, D]
            vc = vc.repeat_interleave(group, dim=1)
            qs = q[q_start:q_start + q_len].float()  # [Q, H, D]
            scores = torch.einsum("qhd,lhd->hql", qs, kc) * self.scale
            qpos = torch.arange(start_pos, ctx_len).unsqueeze(1)
            kpos = torch.arange(ctx_len).unsqueeze(0)
            scores = scores.masked_fill(kpos > qpos, float("-inf"))
            probs = scores.softmax(-1)
            out[q_start:q_start + q_len] = torch.einsum("hql,lhd->qhd", probs, vc).to(q.dtype)
        return out
