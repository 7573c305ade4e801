"""Model files take their layers from kvserve.models.layers, and the loader maps HF names
through what the model class declares (no per-architecture code in the loader)."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

from kvserve.models import layers
from kvserve.models.llama import LlamaForCausalLM
from kvserve.models.loader import WeightMapping, load_model, load_weights, named_tensors
from kvserve.models.model_config import parse_model_config
from tests.helpers.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"))  # q/k/v biases, tied head


def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def empty_model(cls, cfg) -> torch.nn.Module:
    torch.manual_seed(1)
    return cls(cfg, 64)


def test_llama_is_built_from_the_layers_module(qwen2):
    cfg = parse_model_config(qwen2)
    model = empty_model(LlamaForCausalLM, cfg)
    attn = model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, layers.MergedLinear) and isinstance(attn.o_proj, layers.Linear)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    assert attn.qkv_proj.output_sizes == [q, kv, kv] and attn.qkv_proj.bias is not None
    assert model.layers[0].mlp.gate_up_proj.output_sizes == [cfg.intermediate_size] * 2
    assert isinstance(model.norm, layers.RMSNorm)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, layers.Linear) for m in linears)


def test_tensors_in_memory_load_like_the_checkpoint_files(qwen2):
    model, cfg = load_model(qwen2, torch.float32, "cpu", max_positions=64)
    mem = empty_model(LlamaForCausalLM, cfg)
    load_weights(mem, cfg, named_tensors(hf_tensors(qwen2).items()), torch.float32, "state dict")
    ours = dict(mem.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, ours[name]), name


class RenamedLlama(LlamaForCausalLM):
    """Another checkpoint layout (prefix and shard names), declared on the class only."""

    checkpoint_prefix: ClassVar[str] = "transformer."
    packed_modules: ClassVar[dict[str, tuple[str, ...]]] = {"qkv_proj": ("wq", "wk", "wv"),
                                                            "gate_up_proj": ("w1", "w3")}


RENAMES = {"model.": "transformer.", "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "gate_proj": "w1",
           "up_proj": "w3"}


def renamed(name: str) -> str:
    for a, b in RENAMES.items():
        name = name.replace(a, b)
    return name


def test_a_model_class_declares_its_own_mapping(qwen2):
    model, cfg = load_model(qwen2, torch.float32, "cpu", max_positions=64)
    other = empty_model(RenamedLlama, cfg)
    tensors = {renamed(k): v for k, v in hf_tensors(qwen2).items()}
    assert "transformer.layers.0.self_attn.wq.bias" in tensors
    load_weights(other, cfg, named_tensors(tensors.items()), torch.float32, "renamed")
    ours = dict(other.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, ours[name]), name
    m = WeightMapping(other, cfg)
    assert m.target("transformer.layers.3.mlp.w3.weight") == ("layers.3.mlp.gate_up_proj.weight", 1)
    assert m.target("lm_head.weight") == ("lm_head.weight", None)


def test_mapping_errors_name_the_tensor(qwen2):
    cfg = parse_model_config(qwen2)
    good = hf_tensors(qwen2)
    extra = dict(good, **{"model.layers.0.self_attn.rope_scale": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.rope_scale'"):
        load_weights(empty_model(LlamaForCausalLM, cfg), cfg, named_tensors(extra.items()), torch.float32, "x")
    short = {k: v for k, v in good.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensors for \['layers.1.self_attn.qkv_proj.weight'\]"):
        load_weights(empty_model(LlamaForCausalLM, cfg), cfg, named_tensors(short.items()), torch.float32, "x")
    bad = dict(good)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj.weight' has shape"):
        load_weights(empty_model(LlamaForCausalLM, cfg), cfg, named_tensors(bad.items()), torch.float32, "x")
