"""Run a kvserve model (kvserve/models/llama.py) one sequence at a time with a dense KV cache.

The reference executor for speculative decoding outside the engine: the
draft-model proposer runs its draft through it, and the reference
speculative loop (kvserve.spec_decode.reference) scores the target with it.
The engine proper runs models on its paged KV pool; this is the small,
obviously-correct path (one request, contiguous cache, SDPA with an offset
causal mask) the integration can be held equal to.

Rollback is by token identity: a `DenseSequence` remembers which tokens its
cache holds; `ensure(tokens)` keeps the longest cached prefix that agrees
with `tokens`, drops the rest (rejected drafts) and computes what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, cast

import torch
import torch.nn.functional as F

from kvserve.models.loader import load_model
from kvserve.models.model_config import ModelArchConfig


class DenseSequence:
    """One sequence's KV: per layer K and V [capacity, num_kv_heads, head_dim], grown by doubling."""

    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype, device: torch.device, capacity: int = 64) -> None:
        shape = (cfg.num_layers, max(capacity, 1), cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)  # [layers, capacity, KVH, D]
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.token_ids: list[int] = []  # the tokens whose K/V rows [0, len) hold

    @property
    def length(self) -> int:
        return len(self.token_ids)

    def reserve(self, n: int) -> None:
        cap = self.k.shape[1]
        if n <= cap:
            return
        new_cap = max(n, 2 * cap)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], new_cap, *old.shape[2:]))
            new[:, :cap] = old
            setattr(self, name, new)

    def truncate(self, n: int) -> None:
        """Forget rows [n, length): rejected drafts' KV is simply not kept."""
        del self.token_ids[n:]

    def common_prefix(self, tokens: Sequence[int]) -> int:
        """Length of the longest common prefix of the cached tokens and `tokens`."""
        return common_prefix(self.token_ids, tokens)


def common_prefix(mine: list[int], tokens: Sequence[int]) -> int:
    """Length of the longest common prefix (list compares run in C; binary search on a mismatch)."""
    theirs = list(tokens)
    n = min(len(mine), len(theirs))
    if mine[:n] == theirs[:n]:
        return n
    lo, hi = 0, n - 1  # prefix [0, lo) agrees; [0, hi + 1) does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mine[:mid] == theirs[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class _DenseContext:
    """What the model's attention layers read; duck-types kvserve.protocol.ForwardContext."""

    backend: "DenseAttention"
    seq: DenseSequence
    start: int  # rows [0, start) are cached; this step writes [start, start + T)


class DenseAttention:
    """The attention backend for `_DenseContext` (same `forward` signature as AttentionBackend)."""

    name = "dense"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.gqa = num_heads != num_kv_heads
        self.scale = head_dim ** -0.5

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: _DenseContext) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] (rotated) -> [T, H, D]; causal over cache + chunk."""
        T, start = q.shape[0], ctx.start
        end = start + T
        ctx.seq.k[layer_idx, start:end] = k
        ctx.seq.v[layer_idx, start:end] = v
        keys = ctx.seq.k[layer_idx, :end].transpose(0, 1).unsqueeze(0)  # [1, KVH, L, D]
        vals = ctx.seq.v[layer_idx, :end].transpose(0, 1).unsqueeze(0)
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        mask = None
        if T > 1 and start > 0:
            qpos = torch.arange(start, end, device=q.device).unsqueeze(1)
            mask = torch.arange(end, device=q.device).unsqueeze(0) <= qpos  # [T, L] True = attend
        o = F.scaled_dot_product_attention(qh, keys, vals, attn_mask=mask, is_causal=(T > 1 and start == 0),
                                           scale=self.scale, enable_gqa=self.gqa)
        return o.squeeze(0).transpose(0, 1)


class DenseModelRunner:
    """A model loaded with kvserve's loader, run per sequence on a `DenseSequence`."""

    def __init__(self, model: torch.nn.Module, cfg: ModelArchConfig) -> None:
        # A kvserve model class (forward(ids, positions, ctx), compute_logits, rotary tables).
        self.model: Any = cast(Any, model)
        self.cfg = cfg
        p = next(self.model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.max_positions = int(self.model.rotary.cos.shape[0])
        self.attn = DenseAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    @classmethod
    def load(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
             max_positions: Optional[int] = None) -> "DenseModelRunner":
        from kvserve.models.model_config import parse_model_config

        max_pos = max_positions or parse_model_config(model_dir).max_position_embeddings
        model, cfg = load_model(model_dir, dtype, device, max_pos)
        return cls(model, cfg)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def new_sequence(self, capacity: int = 64) -> DenseSequence:
        return DenseSequence(self.cfg, self.dtype, self.device, capacity)

    @torch.inference_mode()
    def extend(self, seq: DenseSequence, token_ids: Sequence[int]) -> torch.Tensor:
        """Append `token_ids` to `seq`'s cache; float32 logits [len(token_ids), vocab]."""
        ids = list(token_ids)
        start = seq.length
        if not ids:
            return torch.empty((0, self.cfg.vocab_size))
        if start + len(ids) > self.max_positions:
            raise ValueError(f"sequence of {start + len(ids)} tokens exceeds the model's "
                             f"{self.max_positions} positions")
        seq.reserve(start + len(ids))
        inp = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device)
        hidden = self.model(inp, pos, _DenseContext(self.attn, seq, start))
        seq.token_ids.extend(ids)
        return self.model.compute_logits(hidden)

    def ensure(self, seq: DenseSequence, tokens: Sequence[int], logits_from: int) -> torch.Tensor:
        """Make `seq` hold exactly `tokens`, reusing the cached prefix that agrees with them.

        Returns the logits of positions [logits_from, len(tokens)), recomputing
        from `logits_from` on even where cached (logits are not kept).
        """
        keep = min(seq.common_prefix(tokens), logits_from)
        seq.truncate(keep)
        logits = self.extend(seq, tokens[keep:])
        return logits[logits_from - keep:]
