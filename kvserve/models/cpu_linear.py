"""Linear layers on CPU through oneDNN with pre-packed weights.

Why: on the CPUs this project runs on, torch's `F.linear` (MKL sgemm) is far from
the memory and compute limits for the row counts of serving.  Over the weights of
a whole SmolLM2-135M forward (30 layers + the LM head, float32, 2-core AMD EPYC,
AVX2; `chrt -f 50 python benchmarks/cpu_linear.py`, session 7), median ms per
forward:

    rows            1      2      8     32    128    512
    F.linear     75.5  119.4  149.9  231.5  529.1 1613.2
    oneDNN       49.3   44.9   72.9  130.0  350.3 1183.3

oneDNN wants its weights reordered into its blocked layout once
(`torch.ops.mkldnn._reorder_linear_weight`); `pack_linears(model)` does that once the
weights are loaded (EngineCore.from_config) and frees the plain weights (the packed copy replaces them, so memory is
unchanged), after which `Linear.forward` calls
`torch.ops.mkldnn._linear_pointwise`.

Results equal `F.linear` up to float rounding (another summation order).  The
reference path is a model loaded without packing (`KVSERVE_CPU_LINEAR=reference`,
or `pack_linears` not called): tests/unit/models/test_cpu_linear.py holds the two
equal, and the parity tests hold the packed path to HF transformers token for token.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ENV = "KVSERVE_CPU_LINEAR"  # "onednn" (default) or "reference" (plain F.linear)


def packing_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether models loaded for this device and dtype get packed weights."""
    mode = os.environ.get(ENV, "onednn")
    if mode not in ("onednn", "reference"):
        raise ValueError(f"{ENV}={mode!r}: expected 'onednn' or 'reference'")
    return (mode == "onednn" and device.type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 CPU weight -> oneDNN's packed tensor for it (opaque layout)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None,
           packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T (+ b) for x [..., in]: through `packed` (from `pack`) when given, else F.linear."""
    if packed is None:
        assert weight is not None and weight.numel() > 0, "a packed layer was called without its packed weight"
        return F.linear(x, weight, bias)
    out_features = packed.shape[0]
    if x.numel() == 0:
        return x.new_zeros(*x.shape[:-1], out_features)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], out_features)


def pack_linears(model: nn.Module) -> int:
    """Pack every kvserve Linear of `model` (see module doc) and free its plain weight;
    returns how many were packed.  Call once, after the weights are loaded."""
    from kvserve.models.layers import Linear

    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.packed_weight is None:
            module.packed_weight = pack(module.weight)
            # The packed copy replaces the plain one; shape metadata stays on the module.
            module.weight = nn.Parameter(torch.empty(0, dtype=module.weight.dtype), requires_grad=False)
            count += 1
    pack_head = getattr(model, "pack_lm_head", None)
    if callable(pack_head) and pack_head():  # True when it packed a copy (a tied head)
        count += 1
    logger.debug("oneDNN packed weights for %d linear layers", count)
    return count
