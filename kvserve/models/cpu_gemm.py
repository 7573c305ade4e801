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

__all__ = ["BLOCK", "linear", "load", "pack_weight", "packed_numel"]

BLOCK = 16  # output columns per block; must match kNR in the source


def packed_numel(weight_shape: tuple[int, ...]) -> int:
    """Elements of `pack_weight`'s result for an [N, K] weight."""
    n, k = weight_shape
    return -(-n // BLOCK) * BLOCK * k


def pack_weight(weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, K] float32 -> [ceil(N / 16), K, 16] with P[b, k, j] = W[16 b + j, k] (zero padded).
    `out` (float32, `packed_numel` elements, contiguous) receives it when given: the loader packs
    every weight into one huge-page arena (kvserve.models.cpu_linear.pack_linears)."""
    n, k = weight.shape
    blocks = -(-n // BLOCK)
    padded = weight.detach().float()
    if blocks * BLOCK != n:  # only then a copy with zero rows (at load this pass is on the start-up path)
        padded = F.pad(padded, (0, 0, 0, blocks * BLOCK - n))
    blocked = padded.view(blocks, BLOCK, k).transpose(1, 2)
    if out is None:
        return blocked.contiguous()
    assert out.is_contiguous() and out.numel() == blocks * BLOCK * k and out.dtype == torch.float32
    return out.view(blocks, k, BLOCK).copy_(blocked)


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
