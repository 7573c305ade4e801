"""Dtype names (validated in kvserve.config, torch-free) -> torch dtypes."""
from __future__ import annotations

import torch

from kvserve.config import canonical_dtype


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, canonical_dtype(dtype))  # type: ignore[no-any-return]
