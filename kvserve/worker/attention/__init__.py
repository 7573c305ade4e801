"""Attention backends by name."""
from __future__ import annotations

from kvserve.worker.attention.base import AttentionBackend

_BACKENDS = {
    "torch": "kvserve.worker.attention.torch_paged:TorchPagedAttention",
    "reference": "kvserve.worker.attention.reference:ReferenceAttention",
    "cpu": "kvserve.worker.attention.cpu_paged:CpuPagedAttention",
}


def resolve_backend_name(name: str, device_type: str, dtype) -> str:
    """'auto' -> the fastest backend that works here (the C++ kernel on CPU float32)."""
    import torch

    if name != "auto":
        return name
    if device_type == "cpu" and dtype == torch.float32:
        from kvserve.worker.attention import cpu_ext

        if cpu_ext.load() is not None:
            return "cpu"
    return "torch"


def get_attention_backend(name: str) -> type[AttentionBackend]:
    import importlib

    try:
        module, cls = _BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(_BACKENDS)}") from None
    return getattr(importlib.import_module(module), cls)
