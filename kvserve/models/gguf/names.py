"""llama.cpp tensor names -> Hugging Face checkpoint names, and the Q/K row order.

llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.modify_tensors`) permutes the rows of
q_proj and k_proj for the `llama` architecture, so that its rotary kernel can rotate adjacent
pairs (GPT-J style) where HF rotates the two halves of each head (NeoX style):

    permute(w, n_head) = w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2).reshape(w.shape)

`unpermute_rows` is its inverse.  Qwen2/Qwen3 files are written unpermuted (llama.cpp runs them
with NeoX rotation), so only `llama` is undone.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

# GGUF architecture -> HF architecture class; keys are `general.architecture` values.
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
PERMUTED_QK = frozenset({"llama"})

_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors a file may carry that are not weights of the model: llama.cpp's own rotary table
# (recomputed from the config; rope_freqs is read into the config by gguf/config.py).
IGNORED = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})


def hf_name(gguf_name: str) -> Optional[str]:
    """The HF checkpoint name of a llama.cpp tensor, or None if unknown."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m is None:
        return None
    layer, part, kind = m.groups()
    hf_part = _BLOCK.get(part)
    if hf_part is None:
        return None
    return f"model.layers.{layer}.{hf_part}.{kind}"


def gguf_name(hf: str) -> Optional[str]:
    """The inverse of `hf_name` (used by tests and by anything that writes GGUF)."""
    for k, v in _TOP.items():
        if v == hf:
            return k
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf)
    if m is None:
        return None
    layer, part, kind = m.groups()
    for k, v in _BLOCK.items():
        if v == part:
            return f"blk.{layer}.{k}.{kind}"
    return None


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation (HF NeoX halves -> interleaved pairs), on dim 0."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_rows`: interleaved pairs back to HF's halves, on dim 0."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot undo the Q/K permutation: {rows} rows is not a multiple of 2 x {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def qk_heads(hf: str, num_heads: int, num_kv_heads: int) -> Optional[int]:
    """The head count whose rows llama.cpp permuted in tensor `hf`, or None if it is not Q or K."""
    if ".self_attn.q_proj." in hf:
        return num_heads
    if ".self_attn.k_proj." in hf:
        return num_kv_heads
    return None
