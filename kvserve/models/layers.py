"""The layers model files are built from: linear, norm, rotary (and, next, MoE).

Model files take their layers from here instead of building `nn.Linear`
directly, so there is one place to swap an implementation (quantized weights,
experts kept in host memory, a fused kernel) for every model at once, and so a
new architecture file (Mixtral, Qwen-MoE) only composes these.

Each layer keeps `nn.Linear`'s parameter names (`weight`, `bias`) and its
forward, so swapping costs nothing on the hot path and checkpoints load the
same.  A fused layer records how its output rows split (`output_sizes`): the
loader uses it to place each checkpoint shard (kvserve/models/loader.py).

Where MoE goes: a `FusedMoE(num_experts, top_k, hidden, intermediate)` layer
with a router and per-expert gate_up/down weights stacked on a leading expert
dimension, declared to the loader the same way (expert index as the shard).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.models import cpu_linear
from kvserve.models.rope import RotaryEmbedding, apply_rope

__all__ = ["Linear", "MergedLinear", "RMSNorm", "RotaryEmbedding", "apply_rope", "silu_and_mul"]


class Linear(nn.Linear):
    """y = x W^T (+ b); W: [out_features, in_features].  On CPU in float32 EngineCore
    packs the weight (kvserve.models.cpu_linear: kvserve's blocked kernel, or oneDNN; faster
    than F.linear there, same result up to rounding); `packed_weight` then holds it and
    `weight` is empty, unless the layer keeps it for prefill-sized inputs (`plain_from_rows`)."""

    packed_weight: Optional[torch.Tensor] = None
    # Where set, `weight` stays loaded beside the packed copy and inputs of at least this many rows
    # go through F.linear (MKL): kvserve.models.cpu_linear_rows.
    plain_from_rows: Optional[int] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear.linear(x, self.weight, self.bias, self.packed_weight, self.plain_from_rows)


class MergedLinear(Linear):
    """Several linear maps of the same input fused into one matmul (q|k|v, gate|up).

    `output_sizes[i]` output rows belong to the i-th fused map, in order; the loader
    fills shard i of the weight from the checkpoint tensor the model names for it.
    """

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)


class RMSNorm(nn.Module):
    """Computed in float32 and cast back, as HF transformers does.  With `ext` set
    (kvserve.models.fused_ops.enable) one fused kernel per call; `reference` is the torch code."""

    ext: Any = None  # the CPU kernels' module, or None: the torch code

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ext is not None and x.dim() == 2 and x.is_contiguous():
            return self.ext.rms_norm(x, self.weight, self.eps)
        return self.reference(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add before this norm, fused with it: (h, norm(h)) for h = residual + x."""
        if self.ext is not None and x.dim() == 2 and x.is_contiguous() and residual.is_contiguous():
            h, normed = self.ext.add_rms_norm(x, residual, self.weight, self.eps)
            return h, normed
        h = residual + x
        return h, self.reference(h)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def silu_and_mul(gate_up: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """SwiGLU on a fused [.., 2 * intermediate] gate|up projection."""
    gate, up = gate_up.split(intermediate_size, dim=-1)
    return F.silu(gate) * up
