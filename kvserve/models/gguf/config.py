"""A Hugging Face config.json dict from a GGUF file's metadata (llama.cpp's key names).

The dict goes through the same parser as a config.json on disk (`model_config.arch_config_from_dict`),
so a GGUF model and an HF directory of the same model get the same `ModelArchConfig`; it is also
written as the config.json of the dequantized cache (gguf/cache.py), which makes that cache a
plain HF model directory.
"""
from __future__ import annotations

from typing import Any, Optional

from kvserve.models.gguf.names import ARCHITECTURES
from kvserve.models.gguf.reader import GGUFFile


def _uniform(gf: GGUFFile, key: str, value: Any) -> int:
    """Per-layer lists (some converters write head counts per layer) must be uniform here."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"{gf.path}: {gf.architecture}.{key} differs between layers ({sorted(set(value))}); "
                             "kvserve needs the same value in every layer")
        value = value[0]
    return int(value)


def _required(gf: GGUFFile, key: str) -> Any:
    value = gf.arch_key(key)
    if value is None:
        raise ValueError(f"{gf.path}: GGUF metadata key {gf.architecture}.{key} is missing")
    return value


def rope_scaling(gf: GGUFFile) -> Optional[dict[str, Any]]:
    """HF rope_scaling from `{arch}.rope.scaling.*` (or the older `rope.scale_linear`)."""
    if "rope_freqs.weight" in gf.tensors:
        raise ValueError(
            f"{gf.path}: tensor 'rope_freqs.weight' (per-frequency RoPE factors, as llama.cpp writes for "
            "Llama 3.1-style rope scaling) is not supported"
        )
    kind = gf.arch_key("rope.scaling.type")
    factor = gf.arch_key("rope.scaling.factor")
    if kind is None and gf.arch_key("rope.scale_linear") is not None:
        kind, factor = "linear", gf.arch_key("rope.scale_linear")
    if kind in (None, "none") or (kind == "linear" and float(factor or 1.0) == 1.0):
        return None
    if kind != "linear":
        raise ValueError(f"{gf.path}: GGUF rope scaling type {kind!r} is not supported; supported: none, linear")
    return {"rope_type": "linear", "factor": float(factor)}


def _eos_ids(gf: GGUFFile) -> list[int]:
    # llama.cpp stops on every end-of-generation token: EOS, and EOT/EOM where the file names them
    # (e.g. Llama 3's <|eot_id|>).
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = gf.metadata(key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def hf_config(gf: GGUFFile) -> dict[str, Any]:
    """config.json for the model in `gf`; raises ValueError naming the file for what kvserve cannot run."""
    arch = gf.architecture
    if arch not in ARCHITECTURES:
        raise ValueError(f"{gf.path}: GGUF architecture {arch or '(none)'!r} is not supported; "
                         f"supported: {', '.join(sorted(ARCHITECTURES))}")
    hidden = int(_required(gf, "embedding_length"))
    heads = _uniform(gf, "attention.head_count", _required(gf, "attention.head_count"))
    kv_heads = _uniform(gf, "attention.head_count_kv", gf.arch_key("attention.head_count_kv", heads))
    head_dim = int(gf.arch_key("attention.key_length") or hidden // heads)
    value_dim = gf.arch_key("attention.value_length")
    if value_dim is not None and int(value_dim) != head_dim:
        raise ValueError(f"{gf.path}: key length {head_dim} != value length {value_dim} is not supported")
    rope_dim = gf.arch_key("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(f"{gf.path}: partial rotary embeddings (rope.dimension_count {rope_dim} "
                         f"of head size {head_dim}) are not supported")
    emb = gf.tensors.get("token_embd.weight")
    if emb is None:
        raise ValueError(f"{gf.path}: tensor 'token_embd.weight' (the token embedding) is missing")
    vocab = emb.shape[0]
    meta_vocab = gf.arch_key("vocab_size")
    if meta_vocab is not None and int(meta_vocab) != vocab:
        raise ValueError(f"{gf.path}: {arch}.vocab_size {meta_vocab} != token_embd.weight rows {vocab}")
    bos = gf.metadata("tokenizer.ggml.bos_token_id")
    eos = _eos_ids(gf)
    return {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _uniform(gf, "feed_forward_length", _required(gf, "feed_forward_length")),
        "num_hidden_layers": int(_required(gf, "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(gf.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(gf.arch_key("rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling(gf),
        "max_position_embeddings": int(gf.arch_key("context_length", 4096)),
        # llama.cpp writes no output.weight when the head is the embedding
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gf.tensors,
        "use_sliding_window": False,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": "float32",
    }
