"""`int8` and `fp8`: scaled 8-bit quantization, KIVI-style grouping.

Keys have outlier *channels*, values do not (KIVI, Liu et al. 2024), so:
  K scales: one per (layer, head, channel), over the block's tokens  -> [L, 1, H, D]
  V scales: one per (layer, token, head), over head_dim              -> [L, T, H, 1]
Scales are stored as float16, rounded *up* before use, so |x| / scale never
exceeds the code range and the error bound holds exactly:
  int8: |x - x^| <= scale / 2                      (scale = absmax / 127)
  fp8 (float8_e4m3fn, 3 mantissa bits): |x - x^| <= max(|x| * 2^-4, scale * 2^-10)
(plus the final rounding to a 16-bit output dtype).

Payload: K scales fp16, V scales fp16, K codes, V codes (uint8 each), in that order.
"""
from __future__ import annotations

import math

import torch

from kvserve.kv_store.codecs.base import Codec, CodecError, check_block_layout
from kvserve.kv_store.codecs.raw import tensor_from_bytes, tensor_to_bytes

_FP16_MAX = float(torch.finfo(torch.float16).max)


def _round_up_fp16(s: torch.Tensor) -> torch.Tensor:
    """Smallest float16 >= s (elementwise, s >= 0 finite and <= fp16 max)."""
    h = s.to(torch.float16)
    up = torch.nextafter(h, torch.full_like(h, math.inf))
    return torch.where(h.float() < s, up, h)


class _Scaled8BitCodec(Codec):
    qmax: float = 1.0                # largest code magnitude
    code_dtype: torch.dtype = torch.int8

    @property
    def identity(self) -> str:
        return f"{self.name}-kchan-vtok-v1"

    def _scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_absmax = x[:, 0].abs().amax(dim=1, keepdim=True)   # [L, 1, H, D]
        v_absmax = x[:, 1].abs().amax(dim=3, keepdim=True)   # [L, T, H, 1]
        k_s = k_absmax / self.qmax
        v_s = v_absmax / self.qmax
        if max(float(k_s.max()), float(v_s.max())) > _FP16_MAX:
            raise CodecError(f"{self.name}: |x| too large for float16 scales")
        return _round_up_fp16(k_s), _round_up_fp16(v_s)

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, block: torch.Tensor) -> bytes:
        check_block_layout(block)
        x = block.detach().cpu().float()
        if not bool(torch.isfinite(x).all()):
            raise CodecError(f"{self.name}: non-finite values in block")
        k_s, v_s = self._scales(x)
        k_q = self._quantize(x[:, 0], k_s.float())
        v_q = self._quantize(x[:, 1], v_s.float())
        return b"".join(tensor_to_bytes(t) for t in (k_s, v_s, k_q, v_q))

    def decode(self, data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) != 5 or shape[1] != 2:
            raise CodecError(f"{self.name}: bad shape {shape}")
        L, _, T, H, D = shape
        sizes = [2 * L * H * D, 2 * L * T * H, L * T * H * D, L * T * H * D]
        if len(data) != sum(sizes):
            raise CodecError(f"{self.name}: payload {len(data)} bytes, expected {sum(sizes)}")
        mv = memoryview(data)
        offs = [0]
        for s in sizes:
            offs.append(offs[-1] + s)
        k_s = tensor_from_bytes(mv[offs[0]:offs[1]], torch.float16, (L, 1, H, D)).float()
        v_s = tensor_from_bytes(mv[offs[1]:offs[2]], torch.float16, (L, T, H, 1)).float()
        k_q = tensor_from_bytes(mv[offs[2]:offs[3]], self.code_dtype, (L, T, H, D))
        v_q = tensor_from_bytes(mv[offs[3]:offs[4]], self.code_dtype, (L, T, H, D))
        out = torch.stack([self._dequantize(k_q) * k_s, self._dequantize(v_q) * v_s], dim=1)
        return out.to(dtype)


def _safe_div(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # scale == 0 only where the whole group is 0, so the quotient is 0 there.
    return x / torch.where(scale > 0, scale, torch.ones_like(scale))


class Int8Codec(_Scaled8BitCodec):
    name = "int8"
    qmax = 127.0
    code_dtype = torch.int8

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.round(_safe_div(x, scale)).clamp_(-127, 127).to(torch.int8)

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float()


class Fp8Codec(_Scaled8BitCodec):
    name = "fp8"
    qmax = 448.0                       # largest finite float8_e4m3fn
    code_dtype = torch.float8_e4m3fn

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # Clamp first: e4m3fn has no inf, out-of-range casts would give NaN.
        return _safe_div(x, scale).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float()
