"""kvserve's own CPU linear kernel on column-blocked weights (csrc/cpu_model_ops.cpp).

`pack_weight(W)` lays a float32 [N, K] weight out as [ceil(N / 16), K, 16] column blocks;
`linear(x, packed, bias, N)` computes x W^T + b from it.  The kernel streams each block once
per call and reuses it from L2 for every input row, which is what a decode step (few rows,
every weight read once) needs; see the source for the register blocking.  `load()` is None
when the extension cannot be built, and callers then keep oneDNN or F.linear.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from kvserve.models.cpu_kernels import load

__all__ = ["BLOCK", "linear", "load", "pack_weight"]

BLOCK = 16  # output columns per block; must match kNR in the source


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 -> [ceil(N / 16), K, 16] with P[b, k, j] = W[16 b + j, k] (zero padded)."""
    n, k = weight.shape
    blocks = -(-n // BLOCK)
    padded = weight.detach().float()
    if blocks * BLOCK != n:  # only then a copy with zero rows (at load this pass is on the start-up path)
        padded = F.pad(padded, (0, 0, 0, blocks * BLOCK - n))
    return padded.view(blocks, BLOCK, k).transpose(1, 2).contiguous()


_ext: Any = None  # the loaded extension, kept here: `load()` takes a lock, too dear per call on the hot path


def linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], out_features: int) -> torch.Tensor:
    """x [..., K] -> x W^T + b [..., out_features] through the blocked kernel."""
    global _ext
    ext = _ext
    if ext is None:
        ext = _ext = load()
        assert ext is not None, "blocked weights were packed but the CPU model kernels are not loaded"
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = ext.blocked_linear(x2, packed, bias, out_features)
    return y.view(*x.shape[:-1], out_features)
