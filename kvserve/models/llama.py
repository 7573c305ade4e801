"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) as plain PyTorch.

The model runs on a *flattened* batch: every scheduled token of every request
in one [num_tokens, hidden] tensor, so the linear layers see one large matmul
per step whatever mix of prefill chunks and decodes is running.  Attention is
delegated to the backend in the forward context, which reads and writes the
paged KV cache.

Projections are fused at load time (q|k|v into `qkv_proj`, gate|up into
`gate_up_proj`) to halve the number of matmul launches per layer.  Layers come
from kvserve.models.layers; `packed_modules` tells the loader which checkpoint
tensors are shards of a fused layer.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.models import cpu_linear, layers
from kvserve.models.layers import RMSNorm, RotaryEmbedding, apply_rope
from kvserve.models.model_config import ModelArchConfig
from kvserve.protocol import ForwardContext


class Attention(nn.Module):
    ext: Any = None  # the CPU kernels' module (kvserve.models.fused_ops.enable): rotary in one call

    def __init__(self, cfg: ModelArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = layers.MergedLinear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                                            bias=cfg.attention_bias)
        self.o_proj = layers.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        # Without q/k norms, q and k are rotated in place in the fused projection (one kernel).
        rotated = self.ext is not None and not self.qk_norm and qkv.is_contiguous()
        if rotated:
            self.ext.rope_inplace(qkv, cos.view(T, self.head_dim), sin.view(T, self.head_dim),
                                  self.num_heads + self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if not rotated:
            if self.qk_norm:
                q = self.q_norm(q)
                k = self.k_norm(k)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        out = ctx.backend.forward(self.layer_idx, q, k, v, ctx)  # [T, H, D]
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    ext: Any = None  # the CPU kernels' module (kvserve.models.fused_ops.enable): SwiGLU in one call

    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = layers.MergedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=False)
        self.down_proj = layers.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.ext is not None and gate_up.dim() == 2:
            return self.down_proj(self.ext.silu_and_mul(gate_up))
        return self.down_proj(layers.silu_and_mul(gate_up, self.intermediate_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        h, x = self.post_attention_layernorm.add_forward(attn_out, h)  # h + attn_out, and its norm
        return h + self.mlp(x)


class LlamaForCausalLM(nn.Module):
    # The weight mapping (kvserve.models.loader.WeightMapping): checkpoint names start with
    # this prefix (dropped), and these fused layers take their shards from these names.
    checkpoint_prefix: ClassVar[str] = "model."
    packed_modules: ClassVar[dict[str, tuple[str, ...]]] = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }
    # Checkpoint tensors that are not parameters (recomputed here).
    ignored_checkpoint_tensors: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: ModelArchConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        # [vocab, hidden]; tied models reuse the input embedding.
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.weight
        return self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, h.dtype)
        stack = self.decoder_stack
        if stack is not None and ctx.backend is stack.backend:  # every layer in one C++ call
            return stack.forward(h, cos, sin, ctx)
        for layer in self.layers:
            h = layer(h, cos, sin, ctx)
        return self.norm(h)

    lm_head_packed: Optional[torch.Tensor] = None
    # The layers as one C++ call per step (kvserve.worker.cpu_decoder_stack.attach), used for the
    # steps of the backend it was built for; the Python layers are its reference.
    decoder_stack: Optional[Any] = None

    def pack_lm_head(self) -> bool:
        """Pack the LM head for oneDNN (cpu_linear.pack_linears); True when that packed a new
        tensor.  A tied head is packed as a copy: the embedding keeps its plain table for lookups."""
        if not self.cfg.tie_word_embeddings:
            self.lm_head_packed = self.lm_head.packed_weight  # packed with the other Linears
            return False
        self.lm_head_packed = cpu_linear.pack(self.embed_tokens.weight)
        return True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        if self.lm_head_packed is not None:
            return cpu_linear.linear(hidden, None, packed=self.lm_head_packed).float()
        return F.linear(hidden, self.lm_head_weight).float()
