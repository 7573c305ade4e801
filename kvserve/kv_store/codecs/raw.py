"""`raw`: the tensor's bytes as they are (bit-exact for every dtype)."""
from __future__ import annotations

import math

import numpy as np
import torch

from kvserve.kv_store.codecs.base import Codec, CodecError


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    # Viewing as uint8 works for every dtype, bfloat16 included (numpy has none).
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise CodecError(f"raw payload is {len(data)} bytes, {dtype}{list(shape)} needs {expected}")
    # One copy: the stored buffer may be read-only or reused by the caller.
    buf = np.frombuffer(data, dtype=np.uint8).copy()
    return torch.from_numpy(buf).view(dtype).reshape(shape)


class RawCodec(Codec):
    name = "raw"
    lossless = True

    def encode(self, block: torch.Tensor) -> bytes:
        return tensor_to_bytes(block)

    def decode(self, data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return tensor_from_bytes(data, dtype, shape)
