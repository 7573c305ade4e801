"""The model facts the engine needs, parsed from a Hugging Face config.json."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2)
    qk_norm: bool  # RMSNorm on q and k per head (Qwen3)
    hidden_act: str = "silu"
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    torch_dtype: Optional[str] = None

    @property
    def kv_bytes_per_token(self) -> int:
        """Per token, K and V over all layers, in units of one element (multiply by dtype size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def _as_tuple(x: Any) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, int):
        return (x,)
    return tuple(int(v) for v in x)


def rope_settings(cfg: dict[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, scaling dict or None) from either config style.

    transformers >= 5 writes `rope_parameters: {rope_type, rope_theta, ...}`;
    older configs write `rope_theta` and `rope_scaling: {rope_type|type, ...}`.
    """
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default" or not scaling:
        return theta, None
    scaling["rope_type"] = rope_type
    return theta, scaling


SUPPORTED_ROPE_TYPES = ("llama3", "linear")


def parse_model_config(model_dir: str | Path) -> ModelArchConfig:
    """The model facts from `model_dir`/config.json, or from a .gguf file's metadata."""
    path = Path(model_dir)
    from kvserve.models.gguf.reader import is_gguf_path

    if is_gguf_path(path):
        from kvserve.models.gguf.checkpoint import gguf_config_dict

        return arch_config_from_dict(gguf_config_dict(path), path)
    path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a model directory needs a Hugging Face config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return arch_config_from_dict(cfg, path)


def arch_config_from_dict(cfg: dict[str, Any], path: Path) -> ModelArchConfig:
    """Validate an HF config dict; errors name `path` (the config.json or the .gguf it came from)."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else ""
    from kvserve.models.registry import SUPPORTED_ARCHITECTURES

    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: architecture {arch or '(none)'!r} is not supported; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing required fields {missing}")
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"{path}: num_attention_heads {num_heads} not divisible by num_key_value_heads {num_kv_heads}")
    theta, scaling = rope_settings(cfg)
    if scaling is not None and scaling["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{path}: rope scaling type {scaling['rope_type']!r} is not supported; "
            f"supported: default, {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{path}: hidden_act {act!r} is not supported (only silu)")
    sliding = cfg.get("sliding_window")
    use_sliding = cfg.get("use_sliding_window", arch == "MistralForCausalLM")
    if not (sliding and use_sliding):
        sliding = None
    model_type = cfg.get("model_type", "")
    attention_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
    if arch == "Qwen2ForCausalLM":
        attention_bias = True  # Qwen2 always has q/k/v bias (no config flag)
    return ModelArchConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        hidden_act=act,
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_tuple(cfg.get("eos_token_id")),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )
