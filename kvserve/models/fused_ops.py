"""Fused decoder-layer ops on CPU float32 (csrc/cpu_model_ops.cpp), switched on per model.

A decode step runs each layer's elementwise work on a handful of rows, where torch's cost is
dispatch, not arithmetic: RMSNorm alone is seven ops (to, pow, mean, add, rsqrt, mul, mul),
rotary five per tensor.  Fused, a layer's elementwise work is four calls: RMSNorm, rotary of
q and k in place in the q|k|v projection, the residual add with the next RMSNorm, SwiGLU.

`enable(model, ext)` hands the extension to the model's RMSNorm, Attention and MLP modules,
which then call it directly (the decision is made once, at load, not per call: at a few rows
even a few Python checks per op cost as much as the op).  EngineCore.from_config enables it
on CPU float32 unless KVSERVE_CPU_FUSED=0.  Modules without it, and the blended and
reference paths, run the torch code in kvserve/models/layers.py and rope.py;
tests/unit/models/test_fused_ops.py holds the two equal (up to float rounding: another
summation order, a polynomial exp).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from kvserve.models import cpu_kernels

ENV = "KVSERVE_CPU_FUSED"  # "1" (default) or "0": the torch reference path everywhere


def extension_for(device: torch.device, dtype: torch.dtype) -> Optional[Any]:
    """The kernels' module when models for this device and dtype should use them, else None."""
    if os.environ.get(ENV, "1") == "0" or device.type != "cpu" or dtype != torch.float32:
        return None
    return cpu_kernels.load()


def enable(model: nn.Module, ext: Any) -> int:
    """Give every module of `model` that has a fused path (an `ext` attribute) the extension;
    returns how many.  Inference only: the kernels have no backward."""
    count = 0
    for module in model.modules():
        if hasattr(type(module), "ext"):
            module.ext = ext
            count += 1
    return count
