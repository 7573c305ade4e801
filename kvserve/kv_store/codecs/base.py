"""Codec interface: a block tensor to bytes and back.

A codec sees one block `[num_layers, 2, block_size, num_kv_heads, head_dim]`
(K at index 0 of dim 1, V at 1) in float32/bfloat16/float16 and returns bytes;
`decode` gets those bytes plus the dtype and shape (from the entry header) and
returns a tensor of exactly that dtype and shape.

`identity` names the codec *and its parameters and format version*; it is
part of the KV namespace, so changing any parameter makes old entries misses
instead of wrongly decoded data.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class CodecError(Exception):
    """Encoding refused (e.g. non-finite input to a lossy codec) or payload undecodable."""


class Codec(ABC):
    name: str = "?"          # registry name ("raw", "int8", ...)
    lossless: bool = False

    @property
    def identity(self) -> str:
        """Name + version + parameters; mixed into the namespace and stored in headers."""
        return self.name

    @abstractmethod
    def encode(self, block: torch.Tensor) -> bytes:
        """Encode a host tensor; must not modify it."""

    @abstractmethod
    def decode(self, data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Inverse of encode; raise CodecError if `data` does not fit dtype/shape."""

    def __repr__(self) -> str:
        return f"<codec {self.identity}>"


def check_block_layout(block: torch.Tensor) -> None:
    if block.dim() != 5 or block.shape[1] != 2:
        raise CodecError(f"expected a [L, 2, T, H, D] block, got shape {tuple(block.shape)}")
    if not block.dtype.is_floating_point:
        raise CodecError(f"expected a floating-point block, got {block.dtype}")
