"""Attention backends by name."""
from __future__ import annotations

from kvserve.worker.attention.base import AttentionBackend

_BACKENDS = {
    "torch": "kvserve.worker.attention.torch_paged:TorchPagedAttention",
    "reference": "kvserve.worker.attention.reference:ReferenceAttention",
}


def get_attention_backend(name: str) -> type[AttentionBackend]:
    import importlib

    try:
        module, cls = _BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(_BACKENDS)}") from None
    return getattr(importlib.import_module(module), cls)
