"""Tiny random-weight models built from real configs, saved in HF format.

Each model is shrunk (few layers, narrow) but keeps what makes its
architecture distinct: GQA ratio, QKV bias, q/k norm, explicit head_dim,
tied/untied embeddings and rope scaling.  Weights are drawn with a larger
std than HF's default so that greedy decoding has clear winners (random
models with tiny weights produce near-uniform logits and constant ties).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
if not SHARED_DATA.is_dir():  # checkout somewhere else: allow an override
    import os

    SHARED_DATA = Path(os.environ.get("KVSERVE_SHARED_DATA", "/work/shared/data"))
CONFIGS = SHARED_DATA / "configs"
TOKENIZERS = SHARED_DATA / "tokenizers"

# name -> (real config file, overrides that make it tiny, extra overrides)
TINY_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3": ("llama-3.1-8b.json", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}),
    "llama-linear": ("llama-3.1-8b.json", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-tied": ("llama-3.1-8b.json", {"rope_scaling": None, "tie_word_embeddings": True}),
    "mistral": ("mistral-7b-v0.3.json", {}),
    "qwen2": ("qwen2.5-0.5b.json", {}),  # qkv bias, tied
    "qwen3": ("qwen3-0.6b.json", {"head_dim": 32}),  # q/k norm, explicit head_dim != hidden/heads
}

SHRINK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)


def build_tiny_model(name: str, out_dir: Path, *, seed: int = 0, std: float = 0.15,
                     overrides: Optional[dict[str, Any]] = None, tokenizer: Optional[str] = None,
                     dtype: torch.dtype = torch.float32, max_shard_size: Optional[str] = None) -> Path:
    """Write a tiny random model `name` (see TINY_SPECS) to out_dir; return out_dir."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_file, extra = TINY_SPECS[name]
    raw = json.loads((CONFIGS / cfg_file).read_text())
    raw.update(SHRINK)
    raw.update(extra)
    raw.update(overrides or {})
    raw.pop("torch_dtype", None)
    if tokenizer is not None:
        tok_dir = TOKENIZERS / tokenizer
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        raw["vocab_size"] = max(raw["vocab_size"], len(tok))
        raw["eos_token_id"] = tok.eos_token_id
        raw["bos_token_id"] = tok.bos_token_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_cfg = out_dir / "config.json"
    tmp_cfg.write_text(json.dumps(raw))
    config = AutoConfig.from_pretrained(str(out_dir))
    config.initializer_range = std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial norm weights
            elif p.dim() == 1:
                p.normal_(0, std)  # biases
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out_dir), **kwargs)
    if tokenizer is not None:
        tok.save_pretrained(str(out_dir))
    return out_dir


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int,
              dtype: torch.dtype = torch.float32) -> list[tuple[list[int], torch.Tensor]]:
    """Per prompt (no padding): HF greedy tokens and the log-softmax at each step [new, vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=dtype)
    model.eval()
    gen_cfg = model.generation_config
    gen_cfg.eos_token_id = None
    gen_cfg.pad_token_id = 0
    out = []
    with torch.no_grad():
        for ids in prompts:
            inp = torch.tensor([ids])
            res = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, generation_config=gen_cfg)
            toks = res.sequences[0, len(ids):].tolist()
            lps = torch.stack([l[0].float() for l in res.logits]).log_softmax(-1)
            out.append((toks, lps))
    return out


def compare_greedy(hf_tokens: list[int], hf_logprobs: torch.Tensor, our_tokens: list[int],
                   our_logprobs: Optional[list[dict]], k: int = 5) -> tuple[bool, int]:
    """Apply the near-tie rule from ARCHITECTURE.md.

    Returns (ok, position of the first divergence or -1).  A divergence is
    accepted only if each side's token is in the other side's top-k at that
    position; comparison stops there.
    """
    for pos, (a, b) in enumerate(zip(hf_tokens, our_tokens)):
        if a == b:
            continue
        hf_topk = set(hf_logprobs[pos].topk(k).indices.tolist())
        ours_topk = set(our_logprobs[pos].keys()) if our_logprobs else set()
        return (b in hf_topk and a in ours_topk), pos
    return len(hf_tokens) == len(our_tokens), -1
