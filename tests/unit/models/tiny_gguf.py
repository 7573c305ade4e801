"""Write small GGUF files in tests, with the `gguf` package's writer, from tiny random HF models.

`hf_to_gguf` does what llama.cpp's convert_hf_to_gguf.py does for the architectures kvserve reads:
llama.cpp tensor names, Q/K rows permuted for `llama`, norms in F32, every other weight in the
type asked for.  Types gguf.quants can quantize (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) use it;
for Q4_K, Q5_K and Q6_K (which it cannot quantize) `quantize_k` builds valid blocks directly, with
the scales and bit packing of ggml's reference quantizer (simplified: no error search), so the
weights stay close to the model's and greedy decoding still means something.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from kvserve.models.gguf.names import gguf_name, permute_rows
from kvserve.models.model_config import rope_settings

GGUF_ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
         "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
ALL_TYPES = list(BLOCK)

# Shapes every type can hold: each linear's input size is a multiple of 256 (the K-quant block).
GGUF_SHRINK = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=512,
                   bos_token_id=1, eos_token_id=2)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(x.shape[0], 2)


def _affine_6bit(sub: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: per 32-element sub-block x ~ d*sc*q - dmin*m, with 6-bit sc, m and q < levels."""
    lo = np.minimum(sub.min(axis=-1), 0.0)  # [n, 8]
    hi = sub.max(axis=-1)
    scale = (hi - lo) / (levels - 1)
    d = (scale.max(axis=-1) / 63).astype(np.float16).astype(np.float32)  # [n]
    dmin = ((-lo).max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d == 0, 1, d)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(-lo / np.where(dmin == 0, 1, dmin)[:, None]), 0, 63).astype(np.uint8)
    step = d[:, None] * sc  # [n, 8]
    q = np.rint((sub + (dmin[:, None] * mn)[..., None]) / np.where(step == 0, 1, step)[..., None])
    q = np.clip(np.where(step[..., None] == 0, 0, q), 0, levels - 1).astype(np.uint8)  # [n, 8, 32]
    return d, dmin, sc, mn, q


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> ggml's 12-byte K-quant scale block."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _nibble_pack(q: np.ndarray) -> np.ndarray:
    """[n, 8, 32] values < 16 -> [n, 128]: group g holds sub-block 2g (low) and 2g+1 (high)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(q.shape[0], 128)


def quantize_k(x: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [rows, cols] -> uint8 [rows, cols // 256 * type_size] blocks of Q4_K, Q5_K or Q6_K."""
    rows, cols = x.shape
    blocks = x.reshape(-1, 256).astype(np.float32)
    n = blocks.shape[0]
    if qtype in ("Q4_K", "Q5_K"):
        levels = 16 if qtype == "Q4_K" else 32
        d, dmin, sc, mn, q = _affine_6bit(blocks.reshape(n, 8, 32), levels)
        parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, mn)]
        if qtype == "Q5_K":
            high = (q >> 4) & 1  # bit i of qh[l] = fifth bit of element l of sub-block i
            parts.append((high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8))
        parts.append(_nibble_pack(q & 0x0F))
    elif qtype == "Q6_K":
        sub = blocks.reshape(n, 16, 16)
        scale = np.abs(sub).max(axis=-1) / 32  # [n, 16]
        d = (scale.max(axis=-1) / 127).astype(np.float16).astype(np.float32)
        sc = np.clip(np.rint(scale / np.where(d == 0, 1, d)[:, None]), -128, 127).astype(np.int8)
        step = d[:, None] * sc
        q = np.rint(sub / np.where(step == 0, 1, step)[..., None])
        q = (np.clip(np.where(step[..., None] == 0, 0, q), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
        # per half h: ql[l] = quarter 0 | quarter 2 << 4, ql[32 + l] = quarter 1 | quarter 3 << 4
        lowq = q & 0x0F
        ql = np.concatenate([lowq[:, :, 0] | (lowq[:, :, 2] << 4), lowq[:, :, 1] | (lowq[:, :, 3] << 4)], axis=-1)
        qh = ((q >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]).sum(axis=2).astype(np.uint8)
        parts = [ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)]
    else:
        raise ValueError(qtype)
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def encode(x: np.ndarray, qtype: str) -> tuple[np.ndarray, Optional[object]]:
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    import gguf
    from gguf import quants

    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return x.astype(np.float32), None
    if qtype == "F16":
        return x.astype(np.float16), None
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        return quantize_k(x, qtype), t
    return quants.quantize(x.astype(np.float32), t), t


TypeChooser = Callable[[str, tuple[int, ...]], str]


def uniform(qtype: str) -> TypeChooser:
    """Every weight in `qtype`, norms (1-D) in F32 as llama.cpp keeps them."""
    return lambda name, shape: "F32" if len(shape) == 1 else qtype


def mixed(name: str, shape: tuple[int, ...]) -> str:
    """A different type per weight, so one small file holds every supported type."""
    if len(shape) == 1:
        return "F32"
    slots = {"token_embd": "Q8_0", "output": "F16", "attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K",
             "attn_output": "Q4_0", "ffn_gate": "Q4_1", "ffn_up": "Q5_0", "ffn_down": "Q5_1"}
    part = name.split(".")[-2]
    qtype = slots.get(part, "F32")
    if name.startswith("blk.1."):  # layer 1 takes the float types and shifts the rest
        qtype = {"Q4_K": "BF16", "Q5_K": "F16", "Q6_K": "Q8_0", "Q4_0": "Q6_K", "Q4_1": "Q4_K",
                 "Q5_0": "Q5_K", "Q5_1": "F32"}.get(qtype, qtype)
    return qtype


def hf_to_gguf(model_dir: Path, out: Path, types: TypeChooser, *, tokenizer: Optional[dict] = None,
               extra_metadata: Optional[Callable[[object], None]] = None,
               extra_tensors: Optional[dict[str, np.ndarray]] = None) -> Path:
    """Convert the HF model in `model_dir` (config.json + model.safetensors) to GGUF at `out`."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    arch = GGUF_ARCH[cfg["architectures"][0]]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_settings(cfg)[0])  # transformers 5 writes rope_parameters
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(0)
    if tokenizer is not None:
        add_tokenizer(w, tokenizer)
    if extra_metadata is not None:
        extra_metadata(w)
    state = load_file(str(Path(model_dir) / "model.safetensors"))
    for hf, t in state.items():
        if hf == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        name = gguf_name(hf)
        assert name is not None, hf
        t = t.float()
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            t = permute_rows(t, heads if ".q_proj." in hf else kv_heads)
        data, raw = encode(t.numpy(), types(name, tuple(t.shape)))
        w.add_tensor(name, data, raw_dtype=raw)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# ----------------------------------------------------------------------------- a tiny tokenizer


def tiny_bpe_tokenizer(vocab_size: int = 512) -> dict:
    """A byte-level BPE vocabulary (GPT-2 alphabet, merges of frequent pairs in a fixed text) with
    ChatML special tokens, as llama.cpp stores one: tokens, token types, merges, special ids."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + alphabet
    merges: list[str] = []
    text = ("the quick brown fox jumps over the lazy dog. what is the capital of france? "
            "paris is the capital of france. hello world, hello there. ") * 4
    byte_map = bytes_to_unicode()
    words = [[byte_map[b] for b in (" " + w if i else w).encode()] for i, w in enumerate(text.split(" "))]
    while len(tokens) < vocab_size:
        counts: dict[tuple[str, str], int] = {}
        for wd in words:
            for a, b in zip(wd, wd[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        for wd in words:
            i = 0
            while i < len(wd) - 1:
                if wd[i] == a and wd[i + 1] == b:
                    wd[i:i + 2] = [a + b]
                i += 1
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))  # 3 CONTROL, 1 NORMAL
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
    return {"model": "gpt2", "pre": "smollm", "tokens": tokens, "types": types, "merges": merges,
            "bos": 1, "eos": 2, "unk": 0, "pad": 2, "chat_template": template}


def add_tokenizer(w: object, tok: dict) -> None:
    w.add_tokenizer_model(tok["model"])  # type: ignore[attr-defined]
    w.add_tokenizer_pre(tok["pre"])  # type: ignore[attr-defined]
    w.add_token_list(tok["tokens"])  # type: ignore[attr-defined]
    w.add_token_types(tok["types"])  # type: ignore[attr-defined]
    w.add_token_merges(tok["merges"])  # type: ignore[attr-defined]
    w.add_bos_token_id(tok["bos"])  # type: ignore[attr-defined]
    w.add_eos_token_id(tok["eos"])  # type: ignore[attr-defined]
    w.add_unk_token_id(tok["unk"])  # type: ignore[attr-defined]
    w.add_pad_token_id(tok["pad"])  # type: ignore[attr-defined]
    w.add_add_bos_token(False)  # type: ignore[attr-defined]
    w.add_chat_template(tok["chat_template"])  # type: ignore[attr-defined]


def build_tiny_hf(name: str, out_dir: Path, **overrides: object) -> Path:
    """A tiny random HF model (tests/helpers/tiny_models.py) in GGUF-friendly sizes."""
    from tests.helpers.tiny_models import build_tiny_model

    return build_tiny_model(name, out_dir, overrides={**GGUF_SHRINK, "rope_scaling": None, **overrides})


def dequant_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max() / x.abs().max())
