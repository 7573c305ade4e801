"""GGML block formats -> float tensors, vectorized in torch over every block of a tensor at once.

Layouts follow ggml (ggml-common.h / ggml-quants.c).  Each `_dq_*` takes the tensor's blocks as
uint8 [n_blocks, type_size] and returns float32 [n_blocks, block_size]; arithmetic is done in
the same order as `gguf.quants` (the reference), so results are bit-identical to it
(tests/unit/models/test_gguf_dequant.py holds them equal).  Why not call `gguf.quants`: its
NumPy kernels are single-threaded and allocate a temporary per step; on SmolLM2-135M's file they
take ~3x longer than these (docs/gguf.md).  Types without a kernel here fall back to it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from kvserve.models.gguf.reader import GGUFTensorInfo

_SHIFT4 = torch.tensor([0, 4], dtype=torch.uint8)


def _half(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 (a little-endian float16) -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] uint8 -> [n, 2k]: the k low nibbles, then the k high nibbles (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _low_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] uint8 (a little-endian uint32) -> [n, 32] of its bits, bit j at column j."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:  # d f16 | qs int8[32];  x = q * d
    return b[:, 2:].contiguous().view(torch.int8).float() * _half(b[:, :2])


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:  # d | qs[16];  x = d * (q - 8)
    q = _nibbles(b[:, 2:]).view(torch.int8) - 8
    return _half(b[:, :2]) * q.float()


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:  # d | m | qs[16];  x = d * q + m
    return _half(b[:, :2]) * _nibbles(b[:, 4:]).float() + _half(b[:, 2:4])


def _dq_q5_0(b: torch.Tensor) -> torch.Tensor:  # d | qh u32 | qs[16];  x = d * (q - 16)
    q = (_nibbles(b[:, 6:]) | (_low_bits(b[:, 2:6]) << 4)).view(torch.int8) - 16
    return _half(b[:, :2]) * q.float()


def _dq_q5_1(b: torch.Tensor) -> torch.Tensor:  # d | m | qh u32 | qs[16];  x = d * q + m
    q = _nibbles(b[:, 8:]) | (_low_bits(b[:, 4:8]) << 4)
    return _half(b[:, :2]) * q.float() + _half(b[:, 2:4])


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block.
    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the
    same for the mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:  # d | dmin | scales[12] | qs[128]; 8 sub-blocks of 32
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_half(b[:, 0:2]) * sc.float()).reshape(n, 8, 1)
    dm = (_half(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    # each 32-byte group of qs holds two sub-blocks: low nibbles, then high nibbles
    q = (b[:, 16:].reshape(n, 4, 1, 32) >> _SHIFT4.reshape(1, 1, 2, 1)) & 0x0F
    return (d * q.reshape(n, 8, 32).float() - dm).reshape(n, 256)


def _dq_q5_k(b: torch.Tensor) -> torch.Tensor:  # d | dmin | scales[12] | qh[32] | qs[128]
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_half(b[:, 0:2]) * sc.float()).reshape(n, 8, 1)
    dm = (_half(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    ql = ((b[:, 48:].reshape(n, 4, 1, 32) >> _SHIFT4.reshape(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    # bit i of qh[l] is the fifth bit of element l of sub-block i
    qh = ((b[:, 16:48].reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)) & 1)
    q = ql | (qh.reshape(n, 8, 32) << 4)
    return (d * q.float() - dm).reshape(n, 256)


def _dq_q6_k(b: torch.Tensor) -> torch.Tensor:  # ql[128] | qh[64] | scales int8[16] | d; 16 of 16
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_half(b[:, 208:210]) * scales).reshape(n, 16, 1)
    ql = ((b[:, :128].reshape(n, 2, 1, 64) >> _SHIFT4.reshape(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = (ql | (qh << 4)).view(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(n, 256)


# type name -> (block_size, type_size, kernel)
BLOCK_KERNELS: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "Q8_0": (32, 34, _dq_q8_0),
    "Q4_0": (32, 18, _dq_q4_0),
    "Q4_1": (32, 20, _dq_q4_1),
    "Q5_0": (32, 22, _dq_q5_0),
    "Q5_1": (32, 24, _dq_q5_1),
    "Q4_K": (256, 144, _dq_q4_k),
    "Q5_K": (256, 176, _dq_q5_k),
    "Q6_K": (256, 210, _dq_q6_k),
}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Blocks per kernel call: bounds the temporaries (a few bytes per element) for large tensors.
_CHUNK_BLOCKS = 1 << 16


def supported_types() -> list[str]:
    """Every type this module can turn into floats (torch kernels, plus gguf.quants' own)."""
    return sorted(set(FLOAT_TYPES) | set(BLOCK_KERNELS) | _reference_types())


def _reference_types() -> set[str]:
    import gguf
    from gguf import quants

    out = set()
    for qtype in gguf.GGMLQuantizationType:
        traits = getattr(quants, "_type_traits", {})
        if qtype in traits:
            out.add(qtype.name)
    return out


def _as_torch(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw))


def dequantize(info: GGUFTensorInfo) -> torch.Tensor:
    """The tensor as floats, shaped `info.shape`: float16/bfloat16/float32 tensors as stored
    (no copy for F32/F16: a view of the mapped file), block types as float32."""
    if info.type_name in FLOAT_TYPES:
        t = _as_torch(info.raw)
        if info.type_name == "BF16":  # the gguf reader hands BF16 over as raw bytes
            t = t.view(torch.bfloat16)
        return t.reshape(info.shape)
    kernel = BLOCK_KERNELS.get(info.type_name)
    if kernel is None:
        return _reference_fallback(info)
    block_size, type_size, fn = kernel
    if info.shape[-1] % block_size:
        raise ValueError(f"tensor {info.name!r} ({info.type_name}): row length {info.shape[-1]} "
                         f"is not a multiple of the block size {block_size}")
    blocks = _as_torch(info.raw).reshape(-1, type_size)
    out = torch.empty(blocks.shape[0], block_size, dtype=torch.float32)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        stop = start + _CHUNK_BLOCKS
        out[start:stop] = fn(blocks[start:stop])
    return out.reshape(info.shape)


def reference_dequantize(info: GGUFTensorInfo) -> torch.Tensor:
    """`gguf.quants.dequantize` (llama.cpp's NumPy reference), as float32 shaped `info.shape`."""
    import gguf
    from gguf import quants

    arr = quants.dequantize(np.asarray(info.raw), gguf.GGMLQuantizationType(info.type_id))
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(info.shape)


def _reference_fallback(info: GGUFTensorInfo) -> torch.Tensor:
    if info.type_name not in _reference_types():
        raise ValueError(
            f"tensor {info.name!r} has GGML type {info.type_name}, which kvserve cannot dequantize; "
            f"supported: {', '.join(supported_types())}"
        )
    return reference_dequantize(info)
