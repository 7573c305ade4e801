"""Architecture name (config.json `architectures[0]`) -> model class."""
from __future__ import annotations

from torch import nn

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    # name -> "module:Class"
    "LlamaForCausalLM": "kvserve.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "kvserve.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "kvserve.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "kvserve.models.llama:LlamaForCausalLM",
}


def model_class(architecture: str) -> type[nn.Module]:
    import importlib

    module, cls = SUPPORTED_ARCHITECTURES[architecture].split(":")
    return getattr(importlib.import_module(module), cls)
